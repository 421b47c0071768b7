"""telerad: teleradiology store-and-forward DICOM service."""

__version__ = "0.1.0"
