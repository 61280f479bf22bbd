"""The publishing side: what runs on the host between steps.

Keras callbacks (`callbacks`), event-file writers (`writer`) and the TensorBoard
layout (`layout`).
"""
