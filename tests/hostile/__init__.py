"""The hostile-input suite: generated malformed DICOM and PDU inputs sent to a running node.

``images`` builds the synthetic chest-like source images and plants the patient markers, ``cases``
generates the deterministic cases of every category, ``pdu`` encodes raw upper-layer PDUs, ``runner``
starts the node and Orthanc, sends the cases and records one outcome row per case. Used by
``tests/test_hostile.py`` (bounded size) and ``bench/hostile.py`` (any size, the before/after table).
"""
