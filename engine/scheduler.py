"""Which sequences run in the next step, and how many of their tokens.

A step has a token budget (max_num_batched_tokens). Running decodes go first (one token each), so streams
keep flowing; then prompts still being prefilled, then waiting sequences, each taking as much of the
remaining budget as it needs (a long prompt is cut into chunks over several steps, never stalling the
decodes). At most max_num_seqs sequences run at once. When the KV blocks run out, the sequence that arrived
last is preempted: its blocks go back and it waits again, to recompute its tokens later (its full blocks
usually still sit in the prefix cache); no request is lost.
"""
from collections import deque

from .sequence import Status


class Scheduler:
    def __init__(self, block_manager, max_num_seqs=16, max_num_batched_tokens=512):
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            # a smaller budget would leave the last running decodes out of every step
            raise ValueError(f"max_num_seqs must be >= 1 and max_num_batched_tokens >= max_num_seqs, got "
                             f"{max_num_seqs} and {max_num_batched_tokens}")
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting, self.running = deque(), []
        self.num_preemptions = 0

    def add(self, seq):
        self.waiting.append(seq)

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def finish(self, seq):
        """Take a finished (or aborted) sequence out, its blocks back to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def schedule(self):
        """The next step: a list of (sequence, number of its next tokens to compute), decodes first."""
        budget, step = self.max_num_batched_tokens, []
        decodes = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        scheduled = set()
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status != Status.RUNNING:  # preempted for an earlier one in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._make_room(seq, seq.num_computed + n, scheduled):
                continue  # seq itself was preempted
            step.append((seq, n))
            scheduled.add(seq)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            parent = seq.parent
            if parent is not None and not parent.finished and parent.num_computed < parent.num_prompt_tokens:
                break  # a sample of n waits for the prompt's blocks, which its first sample computes
            self.blocks.start(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_grow(seq, seq.num_computed + n):
                self.blocks.release(seq)
                break
            self.blocks.grow(seq, seq.num_computed + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.append((seq, n))
            budget -= n
        return step

    def _make_room(self, seq, num_tokens, scheduled):
        """Blocks for seq to hold num_tokens tokens, preempting the latest arrivals not yet in this step as
        needed; False if seq itself had to go."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = max((s for s in self.running if s not in scheduled), key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def _preempt(self, seq):
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.num_preemptions += 1
        # Back at the head of the queue in arrival order, ahead of anything that came later.
        at = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(at, seq)
