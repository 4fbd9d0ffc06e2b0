"""A batch job's lines made several to a generation: lines whose options differ only in their text, negative
prompt, seed and file share every UNet call, one video per row of its batch.

Each line's starting noise is drawn from its own seed exactly as a generation of its own draws it
(TextToVideo.initial_noise), so its manifest's parameters make its video again, up to the rounding of the kernels
that another batch size gets. Lines whose sampler draws noise at every step (eta > 0, ancestral, SDE, LCM) are made
alone: that noise comes from the line's seed. A key's last, short call is padded with copies of its last line
(made and dropped) where a full call came before it, so the job keeps one shape: a new one is captured or compiled
again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .schedulers import draws_step_noise

PER_LINE = ('text', 'negative_prompt', 'seed', 'output')   # the values that may differ within a call
MAX_VIDEOS_PER_CALL = 16


@dataclass
class Call:
    items: list            # the batch Items it makes, in line order
    padding: int = 0       # copies of the last item's video made and dropped
    key: object = None     # what its items share (shared_key)

    @property
    def rows(self) -> list:
        return self.items + [self.items[-1]] * self.padding

    def alone(self) -> List['Call']:
        """One call per item."""
        return [Call([item], key=self.key) for item in self.items]


def shared_key(item) -> Optional[str]:
    """What a line shares with those it may be made with (its values but PER_LINE); None: it is made alone."""
    if draws_step_noise(item.request.sampler, item.request.eta):
        return None
    return json.dumps({k: v for k, v in item.values.items() if k not in PER_LINE}, sort_keys=True, default=repr)


def plan_calls(items: list, videos_per_call: int) -> List[Call]:
    """The items in calls of up to `videos_per_call` lines of one key, ordered by their first line."""
    by_key: Dict[object, list] = {}
    for item in items:
        key = shared_key(item)
        by_key.setdefault(key if key is not None else ('alone', item.line), []).append(item)
    calls = []
    for key, members in by_key.items():
        for start in range(0, len(members), videos_per_call):
            part = members[start:start + videos_per_call]
            padding = videos_per_call - len(part) if start else 0   # a full call came before this one
            calls.append(Call(part, padding, key))
    return sorted(calls, key=lambda call: call.items[0].line)


def make_call(pipe, call: Call, rank: int) -> List[Tuple[object, object, dict]]:
    """Generate a call's videos: (item, frames (f, h, w, 3) uint8, its manifest entry) per item."""
    rows = call.rows
    first = rows[0]
    options = {k: v for k, v in first.values.items() if k not in PER_LINE}
    options['output_type'] = 'frames'
    if first.request.show_progress is not None:
        options['show_progress'] = first.request.show_progress
    if len(rows) == 1:
        options['seed'] = first.request.seed
    else:   # each row's noise from its own seed, as a call of its own draws it
        options['latents'] = torch.cat([pipe.model.engine.initial_noise(item.request)[0] for item in rows])
    inputs = {'text': [item.request.prompts[0] for item in rows],
              'negative_prompt': [item.request.negative_prompts[0] for item in rows]}
    start = time.perf_counter()
    out = pipe(inputs, **options)
    seconds = (time.perf_counter() - start) / len(rows)
    frames, parameters = (out['frames'], out['parameters']) if len(rows) > 1 else ([out['frames']], [out['parameters']])
    made = []
    for item, clip, params in zip(call.items, frames, parameters):
        params = {**params, 'seed': item.request.seed}   # latents given: the engine knows no seed
        entry = {'line': item.line, 'output': item.output, 'seconds': seconds, 'parameters': params,
                 'request': item.values, 'rank': rank}
        made.append((item, clip, entry))
    return made
