"""The cross-tokenizer distillation objective: a teacher whose tokenizer and vocabulary differ from the student's.

Per row, the text the student's tokens spell is tokenised again by the teacher's tokenizer, with
character offsets on both sides (distill/cross_tokenizer.py). A student position and a teacher
position are paired when the tokens they predict start at the same character: both models have
then read exactly the same text. On those pairs the loss compares the two next-token
distributions without a shared vocabulary, by Universal Logit Distillation (L1 between the sorted
probability vectors at distill.temperature); with `kd: hybrid` the teacher's distribution is moved
onto the student's vocabulary (each teacher token's probability to the student token its text
begins with) and compared exactly with `distill.loss` (× T²). The student's own cross-entropy on every target
token takes 1 − alpha, as in same-vocabulary distillation:

    uld:    loss = alpha · ULD(all tokens) + (1 − alpha) · CE
    hybrid: loss = alpha · shared_weight · D(projected teacher ‖ student) · T² + (1 − alpha) · CE

Metrics: kd_loss (ULD, or the projected divergence), ce_loss, aligned (share of target tokens with a
teacher position); on val, teacher_uld (per target token, unaligned ones counting 0) and aligned.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distillery.config import Config
from distillery.data.splits import IGNORE_INDEX
from distillery.distill.cross_tokenizer import align_positions, char_spans, projected_divergence, projection_map, uld_distance
from distillery.distill.objective import DistillObjective
from distillery.models.load import load_tokenizer, resolve_model_dir
from distillery.train.collate import collate
from distillery.train.objective import shift


class CrossTokenizerObjective(DistillObjective):
    """alpha · (ULD, or the divergence from the projected teacher) + (1 − alpha) · CE against a teacher with another tokenizer."""

    def __init__(self, cfg: Config, tokenizer, student, device: torch.device):
        super().__init__(cfg, tokenizer, student, device)
        self.x = cfg.distill.cross_tokenizer
        self.student_tok = tokenizer
        self.teacher_tok = load_tokenizer(resolve_model_dir(cfg.model.teacher_specs[0][0]))
        self.teacher_vocab = self.teacher.config.vocab_size
        # hybrid: teacher id -> the student token its text begins with (cross_tokenizer.projection_map)
        self.mapping = projection_map(self.teacher_tok, tokenizer, self.teacher_vocab).to(device) if self.x.kd == "hybrid" else None

    def _teacher_view(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The teacher's tokens of each row's text (padded batch), and per row the aligned
        (student position, teacher position) index tensors."""
        rows_ids, s_pos, t_pos = [], [], []
        ids, labels, mask = batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu()
        for row_ids, row_labels, row_mask in zip(ids, labels, mask):
            n = int(row_mask.sum())
            text, s_spans = char_spans(self.student_tok, row_ids[:n].tolist())
            enc = self.teacher_tok(text, add_special_tokens=True, return_offsets_mapping=True)
            t_ids, t_spans = enc["input_ids"][: self.cfg.data.max_length], enc["offset_mapping"][: self.cfg.data.max_length]
            targets = (row_labels[:n] != IGNORE_INDEX).tolist()
            pairs = align_positions(s_spans, [tuple(s) for s in t_spans], targets)
            rows_ids.append(t_ids)
            s_pos.append(torch.tensor([s for s, _ in pairs], dtype=torch.long))
            t_pos.append(torch.tensor([t for _, t in pairs], dtype=torch.long))
        pad = self.teacher_tok.pad_token_id or 0
        padded = collate({"input_ids": rows_ids, "labels": rows_ids}, pad)  # labels unused: the teacher only reads
        return {k: padded[k].to(self.device) for k in ("input_ids", "attention_mask")}, s_pos, t_pos

    def _aligned_logits(self, student_logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(student (n, Vs), teacher (n, Vt)) logits at the n aligned position pairs of the batch."""
        view, s_pos, t_pos = self._teacher_view(batch)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=view["input_ids"], attention_mask=view["attention_mask"], use_cache=False).logits
        rows = torch.cat([torch.full_like(p, i) for i, p in enumerate(s_pos)]).to(self.device)
        s_idx, t_idx = torch.cat(s_pos).to(self.device), torch.cat(t_pos).to(self.device)
        return student_logits[rows, s_idx], teacher_logits[rows, t_idx].float()

    def _kd(self, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        """Per aligned position: the ULD distance, or in hybrid mode distill.loss against the projected teacher (× T²)."""
        if self.mapping is None:
            return uld_distance(s, t, temperature)
        return self.x.shared_weight * projected_divergence(s, t, self.mapping, self.d.loss, self.d.beta, temperature) * temperature**2

    def __call__(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        now = self.current()
        alpha, temperature = now["alpha"], now["temperature"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    **({"output_router_logits": True} if self.aux_coef > 0 else {}))
        s, t = self._aligned_logits(out.logits, batch)
        logits, targets = shift(out.logits, batch["labels"])
        keep = targets != IGNORE_INDEX
        n_targets = int(keep.sum())
        zero = out.logits.sum() * 0.0  # keeps every rank's backward over the whole model (FSDP) when a term is empty
        ce = F.cross_entropy(logits[keep].float(), targets[keep]) if n_targets else zero
        metrics = {"ce_loss": ce.item(), "temperature": temperature, "alpha": alpha, "aligned": s.shape[0] / max(n_targets, 1)}
        if s.shape[0]:
            kd = self._kd(s, t, temperature).mean()
            metrics["kd_loss"] = kd.item()
        else:
            kd = zero
            metrics["kd_loss"] = 0.0
        loss = alpha * kd + (1 - alpha) * ce
        return self.with_router_loss(loss, out, metrics)

    @torch.no_grad()
    def evaluate(self, model, batch: dict[str, Any]) -> dict[str, float]:
        """Sums: student NLL and tokens, the ULD distance to the teacher and the aligned count (at T = 1)."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits, targets = shift(out.logits.float(), batch["labels"])
        keep = targets != IGNORE_INDEX
        n = int(keep.sum())
        nll = F.cross_entropy(logits[keep], targets[keep], reduction="sum").item() if n else 0.0
        s, t = self._aligned_logits(out.logits, batch)
        uld = float(uld_distance(s, t, 1.0).sum()) if s.shape[0] else 0.0
        return {"nll": nll, "tokens": float(n), "teacher_uld": uld, "aligned": float(s.shape[0])}
