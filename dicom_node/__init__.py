"""dicom-node: a DICOM network node that runs a lung-CT AI model inside a PACS workflow."""

__version__ = "0.1.0"

#: Manufacturer written into every object this node produces, and recognised when one comes back.
MANUFACTURER = "dicom-node"
