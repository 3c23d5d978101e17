"""GPU checks run only where CUDA exists; elsewhere they skip cleanly."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_experts_on_cuda_match_cpu(tiny_model_dir):
    from glm_ray.model.loader import load_weights
    from glm_ray.experts.local import LocalExperts

    w = load_weights(tiny_model_dir, dense=False)
    cpu = LocalExperts(w.experts)
    x = torch.randn(9, 64)
    ids = torch.randint(0, 8, (9, 4))
    weights = torch.rand(9, 4)
    want = cpu.forward(1, x, ids, weights)
    for held in w.experts.values():
        held.w13, held.w2, held.slot = held.w13.cuda(), held.w2.cuda(), held.slot.cuda()
    got = LocalExperts(w.experts).forward(1, x.cuda(), ids.cuda(), weights.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
