"""Forward destinations: ``hub`` (upload protocol), ``dicom`` (C-STORE SCU), ``local`` (hub)."""
