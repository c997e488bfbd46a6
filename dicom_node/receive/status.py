"""C-STORE response statuses (PS3.4 Annex B.2.3, PS3.7 Annex C), named."""

import enum


class StoreStatus(enum.IntEnum):
    """The statuses this node answers a C-STORE with."""

    SUCCESS = 0x0000
    #: Processing failure: an error of ours (the job store refused a write, a bug).
    PROCESSING_FAILURE = 0x0110
    #: Refused: SOP class not supported (non-CT instances when configured to reject them).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Refused: out of resources (free disk below the floor, or the disk is full).
    OUT_OF_RESOURCES = 0xA700
    #: Error: data set does not match SOP class (or its SOP Instance UID is not the command's).
    DATASET_MISMATCH = 0xA900
    #: Error: cannot understand: the data set cannot be parsed or is truncated.
    CANNOT_PARSE = 0xC210
    #: Error: cannot understand: an identifying UID is missing or not a valid UID.
    INVALID_IDENTIFIERS = 0xC211
