"""Run uniffi-generated Python bindings (iroh, mls-rs) natively under trio.

The generated modules drive Rust futures with asyncio and copy ``bytes`` arguments into Rust one
byte at a time. We replace two private, generated functions (see ``../shared/notes/iroh.md``):

* ``_uniffi_rust_call_async``: poll the Rust future with a C continuation callback that parks the
  current trio task and wakes it through ``TrioToken.run_sync_soon`` (~12 µs per call, no asyncio
  loop at all). Cancelling the trio task drops the Rust future (``ffi_free``), which is safe in
  the bindings; a result that has been produced is always returned, never lost to a Cancelled.
* ``_UniffiRustBufferBuilder.write``: a ``ctypes.memmove`` instead of a per-byte Python loop
  (~6 MB/s → memcpy speed).

Both rely on names that are not public API, so the binding versions are pinned exactly and
:func:`check_private_names` verifies at start-up that everything we touch exists, failing with a
clear message instead of misbehaving after an upgrade.
"""

from __future__ import annotations

import ctypes
import threading
import types
from typing import Any

import outcome
import trio

REQUIRED_SYNC_NAMES = ("_UniffiRustBufferBuilder", "_UniffiRustBuffer")
REQUIRED_ASYNC_NAMES = (
    "_uniffi_rust_call_async",
    "_uniffi_rust_call_with_error",
    "_UNIFFI_RUST_FUTURE_CONTINUATION_CALLBACK",
    "_UNIFFI_RUST_FUTURE_POLL_READY",
)


class BindingMismatch(RuntimeError):
    """The installed binding does not have the generated internals we patch."""


def check_private_names(module: types.ModuleType, *, async_api: bool) -> None:
    names = REQUIRED_SYNC_NAMES + (REQUIRED_ASYNC_NAMES if async_api else ())
    missing = [n for n in names if not hasattr(module, n)]
    builder = getattr(module, "_UniffiRustBufferBuilder", None)
    if builder is not None:
        missing += [f"_UniffiRustBufferBuilder.{m}" for m in ("write", "_reserve")
                    if not hasattr(builder, m)]
    if missing:
        raise BindingMismatch(
            f"{module.__name__} lacks generated names {missing}; syncnode is validated against "
            "the exact versions pinned in pyproject.toml (iroh==1.2.0, "
            "agentvault-mls-rs-uniffi==0.1.1)"
        )


def _fast_write(self: Any, value: bytes) -> None:
    n = len(value)
    if n == 0:
        return
    with self._reserve(n):
        dst = ctypes.cast(self.rbuf.data, ctypes.c_void_p).value + self.rbuf.len
        ctypes.memmove(dst, bytes(value), n)


# Continuation handles -> (trio token, waiter). Rust may call back from any of its threads.
_waiters: dict[int, tuple[trio.lowlevel.TrioToken, _Waiter]] = {}
_waiters_lock = threading.Lock()
_next_handle = 1


class _Waiter:
    __slots__ = ("aborted", "immediate", "polling_thread", "task")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.aborted = False
        # Set while ffi_poll runs on the trio thread: a continuation that fires synchronously
        # inside ffi_poll (the future was ready at once, the common case for writes) is
        # recorded here instead of going through run_sync_soon and an epoll wake-up.
        self.polling_thread: int | None = None
        self.immediate: int | None = None

    def wake(self, poll_code: int) -> None:  # runs in the trio thread
        if not self.aborted:
            trio.lowlevel.reschedule(self.task, outcome.Value(poll_code))


def _continuation(handle: int, poll_code: int) -> None:
    with _waiters_lock:
        entry = _waiters.pop(handle, None)
    if entry is None:
        return
    token, waiter = entry
    if waiter.polling_thread == threading.get_ident():
        waiter.immediate = poll_code
        return
    try:
        token.run_sync_soon(waiter.wake, poll_code)
    except trio.RunFinishedError:
        pass  # the run that was waiting is gone; nothing to wake


def _make_rust_call_async(module: types.ModuleType) -> Any:
    callback_type = module._UNIFFI_RUST_FUTURE_CONTINUATION_CALLBACK
    c_callback = callback_type(_continuation)
    ready = module._UNIFFI_RUST_FUTURE_POLL_READY
    call_with_error = module._uniffi_rust_call_with_error

    async def rust_call_async(rust_future: Any, ffi_poll: Any, ffi_complete: Any, ffi_free: Any,
                              lift_func: Any, error_ffi_converter: Any) -> Any:
        global _next_handle
        token = trio.lowlevel.current_trio_token()
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                waiter = _Waiter(trio.lowlevel.current_task())
                with _waiters_lock:
                    handle = _next_handle
                    _next_handle += 1
                    _waiters[handle] = (token, waiter)

                def abort(_raise_cancel: Any, waiter: _Waiter = waiter) -> trio.lowlevel.Abort:
                    waiter.aborted = True
                    return trio.lowlevel.Abort.SUCCEEDED

                waiter.polling_thread = threading.get_ident()
                ffi_poll(rust_future, c_callback, handle)
                waiter.polling_thread = None
                if waiter.immediate is not None:
                    poll_code = waiter.immediate
                else:
                    poll_code = await trio.lowlevel.wait_task_rescheduled(abort)
                if poll_code == ready:
                    break
            result = lift_func(call_with_error(error_ffi_converter, ffi_complete, rust_future))
            # Let other tasks run even if every poll completed synchronously (fairness); shielded
            # so a result that exists is never lost to a cancellation.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return result
        finally:
            ffi_free(rust_future)

    rust_call_async._c_callback = c_callback  # type: ignore[attr-defined]  # keep alive
    return rust_call_async


_patched: set[str] = set()


def patch_module(module: types.ModuleType, *, async_api: bool) -> None:
    """Apply the buffer fix (and, for async bindings, the trio driver) once per module."""
    if module.__name__ in _patched:
        return
    check_private_names(module, async_api=async_api)
    module._UniffiRustBufferBuilder.write = _fast_write
    if async_api:
        setattr(module, "_uniffi_rust_call_async", _make_rust_call_async(module))  # noqa: B010
    _patched.add(module.__name__)
