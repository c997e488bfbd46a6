"""The File Meta Information the receiver writes, read back by pydicom."""

from __future__ import annotations

from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.receive.filemeta import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    file_meta_bytes,
)


def _dataset_bytes(implicit: bool) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.44"
    ds.PatientName = "Doe^Jane"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def test_meta_reads_back_with_every_field() -> None:
    """pydicom reads the group: length, version, classes, syntax, implementation, source AE;
    odd-length UIDs are padded with NUL, text with a space."""
    for implicit, syntax in ((False, ExplicitVRLittleEndian), (True, ImplicitVRLittleEndian)):
        head = file_meta_bytes(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid="1.2.3.44",
            transfer_syntax_uid=syntax,
            source_ae_title="PACS ",
        )
        ds = dcmread(BytesIO(head + _dataset_bytes(implicit)))
        meta = ds.file_meta
        assert meta.FileMetaInformationVersion == b"\x00\x01"
        assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert meta.MediaStorageSOPInstanceUID == "1.2.3.44"
        assert meta.TransferSyntaxUID == syntax
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
        assert meta.SourceApplicationEntityTitle == "PACS"
        # the group length counts exactly the elements that follow it
        assert meta.FileMetaInformationGroupLength == len(head) - 132 - 12
        assert ds.PatientName == "Doe^Jane"
