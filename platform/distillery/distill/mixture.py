"""Several teachers as one: the weighted mixture of their probabilities.

With teachers i = 1..M, weights w_i (Σ w_i = 1) and logits z_i, the target at temperature T is

    p_T = Σ_i w_i · softmax(z_i / T)

i.e. each teacher is tempered on its own and their probabilities are averaged (not their logits:
averaging logits is a product of experts, which sharpens where the teachers agree and is not what
a weighted vote means). For forward KL this makes the KD gradient exactly the weighted sum of the
per-teacher gradients: d KL(p_T‖q_T)/ds = q_T − p_T = Σ_i w_i (q_T − p_{i,T}), since the entropy
of p_T does not depend on the student (tests/unit/test_multi_teacher.py checks the identity).

The losses take dense teachers as logits they temper themselves (softmax(logits / T)), so the
mixture is handed over as the logits `T · log p_T`, which that tempering turns back into p_T exactly.
The online objective does not form those (B, T, V) logits: it hands the losses a
`losses.TeacherMixture`, which calls `mixture_logits` on each chunk of positions.
"""

from __future__ import annotations

import math

import torch


def mixture_logits(logits: list[torch.Tensor], weights: list[float], temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is the weighted mixture of the teachers' tempered softmaxes.

    logits: M tensors (..., V), one per teacher, same shape; weights: M floats summing to 1.
    Returns (..., V) float32 equal to T · log Σ_i w_i softmax(z_i / T). One teacher is returned as
    float32 logits unchanged (identical loss, no extra (.., V) tensors).
    """
    if len(logits) != len(weights):
        raise ValueError(f"{len(logits)} teacher logits but {len(weights)} weights")
    if len(logits) == 1:
        return logits[0].float()
    T = float(temperature)
    mixed = None
    for z, w in zip(logits, weights):
        term = torch.log_softmax(z.float() / T, dim=-1).add_(math.log(w))
        mixed = term if mixed is None else torch.logaddexp(mixed, term, out=mixed)
    return mixed.mul_(T)
