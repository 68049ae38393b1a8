"""Packs one scheduled step into the model's forward over packed sequences and returns the logits wanted.

For each (sequence, n) of the step: its next n tokens, at positions num_computed .., its block table row
(padded with block 0 past its blocks; the kernels never read a block beyond the sequence's length). Only a
sequence whose step reaches its last known token needs logits (a prefill chunk short of the prompt's end
does not), so only those rows go through the output head. With `graphs` (engine/cuda_graphs.py), a step of
decodes only (each sequence's one next token) replays a captured graph instead.
"""
import torch


class ModelRunner:
    def __init__(self, model, device, graphs=None):
        self.model, self.device, self.graphs = model, torch.device(device), graphs

    @torch.inference_mode()
    def run(self, step):
        """step: [(sequence, n)]. Returns (sequences to sample, their logits float32 (len, V))."""
        width = max(len(seq.block_table) for seq, _ in step)
        table = torch.zeros(len(step), width, dtype=torch.int32)
        for b, (seq, _) in enumerate(step):
            table[b, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        if self.graphs is not None and len(step) <= self.graphs.max_batch and all(
                n == 1 and seq.num_computed + 1 == seq.num_tokens for seq, n in step):
            seqs = [seq for seq, _ in step]
            logits = self.graphs.run([s.token_ids[s.num_computed] for s in seqs], [s.num_computed for s in seqs],
                                     table.to(self.device))
            return seqs, logits
        tokens, cu, cached, rows, sample = [], [0], [], [], []
        for seq, n in step:
            tokens.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
            cached.append(seq.num_computed)
            cu.append(cu[-1] + n)
            if seq.num_computed + n == seq.num_tokens:
                rows.append(cu[-1] - 1)
                sample.append(seq)
        d = self.device
        logits = self.model.forward_packed(torch.tensor(tokens, dtype=torch.long, device=d),
                                           torch.tensor(cu, dtype=torch.int32, device=d),
                                           torch.tensor(cached, dtype=torch.int32, device=d), table.to(d),
                                           torch.tensor(rows, dtype=torch.long, device=d))
        return sample, logits
