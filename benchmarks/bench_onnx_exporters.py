"""Seconds per ONNX graph of a tiny ds_resnet20 subnet: torch.export alone, the dynamo exporter
(optimize off / on) and the TorchScript-based exporter, twice each (the first includes warm-up).
Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_onnx_exporters.py (writes into /tmp/onnxexp)."""
import os, time, sys
os.makedirs("/tmp/onnxexp", exist_ok=True)
t0 = time.time()
import timm, torch, onnxscript, dsnet
from dsnet.deploy.extract import extract_subnet
torch.set_num_threads(1)
print("imports", time.time() - t0)
KW = {"num_classes": 4, "base_mults": (0.5, 1.0), "width_mults": (0.25, 0.5, 1.0)}
net = timm.create_model("ds_resnet20", **KW).eval()
x = torch.randn(2, 3, 32, 32)
for i in range(2):
    sub = extract_subnet(net, i).eval()
    t = time.time(); ep = torch.export.export(sub, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)); t1 = time.time()
    print("torch.export", t1 - t)
    for opt in (False, True):
        t = time.time()
        torch.onnx.export(sub, (x,), f"/tmp/onnxexp/p{i}{opt}.onnx", dynamo=True, optimize=opt, input_names=["input"], output_names=["logits"], dynamic_shapes=({0: "batch"},), verbose=False)
        print("onnx dynamo optimize", opt, time.time() - t)
    t = time.time()
    torch.onnx.export(sub, (x,), f"/tmp/onnxexp/l{i}.onnx", dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    print("legacy", time.time() - t)
