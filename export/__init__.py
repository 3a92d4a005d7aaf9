"""Export of the reference modules (installed as `ldm_engine.export`).

    graphs.py       what each exported graph is: wrapped module, named inputs/outputs, dynamic axes
    onnx_export.py  ONNX export of one component (external data past 2 GB, checker, shape inference)
    parity.py       an exported graph on ONNX Runtime against its torch module
    cache.py        the artifact cache (keys, atomic builds, damaged-artifact rebuilds)
    artifacts.py    a model's graphs from the cache, exported on first use
    trt_engines.py  TensorRT profiles, precision plans, engine side files; the builder call
    export_onnx.py  `python export/export_onnx.py`
    build_trt.py    `python export/build_trt.py`
"""
