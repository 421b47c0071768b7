"""The shared core: domain types and plain mechanisms every room uses.

Nothing here imports any other telerad package (a test enforces it): priorities, DICOM
identity, durable file writes, the bundle wire format, back-off, and the settings base.
"""
