"""Helpers for test harnesses shipped with the product.

They start real peers (Orthanc as a PACS) on loopback ports, so that the node's own tests and a
person trying the node by hand wire it to the same thing. Nothing here is imported by the node
itself.
"""
