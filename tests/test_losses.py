"""The Selfie loss against the paper's definition, and the accuracy metric."""

import math

import torch

from selfie.config import get_preset
from selfie.losses import selfie_loss, top1_accuracy
from selfie.models.selfie import Selfie
from selfie.patches import sample_masks


def _tiny_forward_parts():
    torch.manual_seed(0)
    model = Selfie(get_preset("tiny")).eval()
    images = torch.randn(3, 3, 32, 32)
    visible, masked = sample_masks(3, 16, 12, torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model.encode_patches(images)
        u = model.summarize(h, visible)
        out = model.score(u, h, masked)
    return model, h, u, masked, out


def test_logits_are_the_papers_dot_products():
    """logits[b, j, k] = <u_b + pos_{m_j}, h_{b, m_k}>, checked entry by entry."""
    model, h, u, masked, out = _tiny_forward_parts()
    pos = model.position().detach()
    b_count, m_count = masked.shape
    assert out.logits.shape == (b_count, m_count, m_count)
    for b in range(b_count):
        for j in range(m_count):
            for k in range(m_count):
                want = torch.dot(u[b] + pos[masked[b, j]], h[b, masked[b, k]])
                torch.testing.assert_close(out.logits[b, j, k], want, rtol=1e-5, atol=1e-5)


def test_selfie_loss_equals_naive_loop():
    """The batched loss equals -log softmax_k(<u_b + pos_{m_j}, h_{b,m_k}>)[j], averaged."""
    model, h, u, masked, out = _tiny_forward_parts()
    pos = model.position().detach()
    b_count, m_count = masked.shape
    total = 0.0
    for b in range(b_count):
        for j in range(m_count):
            query = u[b] + pos[masked[b, j]]
            scores = [torch.dot(query, h[b, masked[b, k]]).item() for k in range(m_count)]
            log_norm = math.log(sum(math.exp(s) for s in scores))
            total += log_norm - scores[j]
    naive = total / (b_count * m_count)
    assert math.isclose(selfie_loss(out.logits, out.targets).item(), naive, rel_tol=1e-5)


def test_equal_logits_give_log_m():
    """With all M patches scored alike the loss is exactly the entropy of a uniform choice."""
    logits = torch.full((2, 4, 4), 3.5)
    targets = torch.arange(4).expand(2, 4)
    torch.testing.assert_close(selfie_loss(logits, targets), torch.tensor(math.log(4)))


def test_top1_accuracy_counts_argmax_hits():
    """Accuracy is the fraction of rows whose arg-max is the target."""
    logits = torch.tensor([[[5.0, 1.0, 0.0], [0.0, 1.0, 2.0]], [[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 1], [1, 2]])  # hits: yes, no; yes, no
    assert top1_accuracy(logits, targets).item() == 0.5
    assert top1_accuracy(logits[0, :1], targets[0, :1]).item() == 1.0
