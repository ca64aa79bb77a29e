"""Every op's sample inputs (tests/samples.py) on every backend against the fp64 reference, and opcheck.

Backends: the CPU op on each ISA path this machine runs, the CUDA op when a GPU is present, and the CUDA
kernels on the CPU through the SIMT emulator (torch.ops.fastdistill_simt)."""
import pytest
import torch

import fastdistill
import fastdistill._simt  # noqa: F401  (registers torch.ops.fastdistill_simt)
from fastdistill.isa import available_cpu_isas
from samples import OPS

BACKENDS = [f"cpu-{isa}" for isa in available_cpu_isas()] + ["simt"] + (["cuda"] if torch.cuda.is_available() else [])
# Defects these samples found that are not fixed yet, {(op, sample name, backend): why}: each runs, and must fail
# until it is fixed (strict xfail).
KNOWN_DEFECTS = {}
# kd_loss_fused has no emulator build: its GPU kernels are kd_loss_forward's and kd_loss_backward's.
CASES = [(op, i, sample.name, backend) for op, spec in OPS.items() for i, sample in enumerate(spec.samples())
         for backend in BACKENDS if spec.simt or backend != "simt"]


def _run(op, backend, sample_index):
    spec = OPS[op]
    device = "cuda" if backend == "cuda" else "cpu"
    ns = torch.ops.fastdistill_simt if backend == "simt" else torch.ops.fastdistill
    args = spec.samples()[sample_index].to(device)
    op_args = spec.op_args(ns, args)
    spec.check(getattr(ns, op)(*op_args), args)


@pytest.mark.parametrize("op,index,name,backend", CASES, ids=[f"{op}-{name}-{backend}" for op, _, name, backend in CASES])
def test_sample_matches_reference(op, index, name, backend, request):
    why = KNOWN_DEFECTS.get((op, name, backend))
    if why:
        request.applymarker(pytest.mark.xfail(reason=why, strict=True, raises=AssertionError))
    if backend.startswith("cpu-"):
        with fastdistill.cpu_isa(backend[4:]):
            _run(op, backend, index)
    else:
        _run(op, backend, index)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("op", list(OPS))
def test_opcheck_every_sample(op, device):
    spec = OPS[op]
    for sample in spec.samples():
        args = sample.to(device)
        torch.library.opcheck(getattr(torch.ops.fastdistill, op).default, spec.op_args(torch.ops.fastdistill, args),
                              test_utils=spec.opcheck_utils)
