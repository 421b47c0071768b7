"""Station gateway: durable DICOM listener, spool, study tracking and store-and-forward."""


class GatewayError(Exception):
    """Base class for gateway failures; translated to DICOM statuses only at the SCP edge."""
