"""HL7 v2 out: the triage priority as an ORU^R01 message, sent over MLLP, its ACK checked.

A room of its own beside ``dicom_io`` (both speak to hospital systems); built on python-hl7
(``hl7``): its parser and escaping for the message, its MLLP streams for the connection.
"""
