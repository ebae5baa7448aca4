"""Where a syncnode keeps its data: the :class:`Storage` interface (:mod:`.base`) and its
implementations (:mod:`.sqlite`, the default; :mod:`.postgres`, the server database). Only
the implementations hold SQL."""

from syncnode.storage.base import (
    JOIN_REQUEST_KIND,
    MAILBOX_ITEM_OVERHEAD,
    BatchHook,
    Change,
    DecidedRecord,
    GroupRecord,
    HostingRecord,
    MailboxPutResult,
    MailboxQuota,
    MailboxRecord,
    MailboxRefusal,
    MailboxUsage,
    SenderSummary,
    SharedStorage,
    Storage,
    StorageClosed,
    StorageConflict,
    digest_term,
)

__all__ = [
    "JOIN_REQUEST_KIND",
    "MAILBOX_ITEM_OVERHEAD",
    "BatchHook",
    "Change",
    "DecidedRecord",
    "GroupRecord",
    "HostingRecord",
    "MailboxPutResult",
    "MailboxQuota",
    "MailboxRecord",
    "MailboxRefusal",
    "MailboxUsage",
    "SenderSummary",
    "SharedStorage",
    "Storage",
    "StorageClosed",
    "StorageConflict",
    "digest_term",
]
