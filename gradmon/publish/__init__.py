"""The publishing side: what runs on the host between steps.

Each observer's host side (`publisher`: its one `Schedule` from `schedule`, reading the
device back, the warnings of `alerts`, writing), Keras callbacks (`callbacks`:
`GradientMonitor`; `policy`: `PolicyWatch`), event-file writers (`writer`) and the
TensorBoard layout (`layout`).
"""
