"""The DICOM listener: associations, C-ECHO and C-STORE into the spool."""
