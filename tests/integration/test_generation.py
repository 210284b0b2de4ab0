"""Batched sampling (finetune.generation): left padding changes nothing, a seed repeats the samples, completions stop
at the template's end-of-turn tokens. The embedded tiny LLaMA, CPU, seconds."""

import pytest
import torch

from finetune.config import ModelConfig
from finetune.data import load_conversations, prompt_and_reference
from finetune.generation import Completion, Decoding, cut_at_stop, generate, left_pad
from finetune.models import load_base_model
from finetune.templates import get_template, render_prompt, stop_token_ids


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_base_model(ModelConfig(), for_training=False).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Suite prompts of different lengths, rendered with the llama3 template (so batches need padding)."""
    template = get_template("llama3", tokenizer)
    convs = load_conversations("bundled:suite_messages_eval.jsonl", limit=40)
    ids = [render_prompt(template, prompt_and_reference(c)[0], tokenizer) for c in convs]
    ids.sort(key=len)
    return [ids[0], ids[len(ids) // 2], ids[-1]]


def test_left_pad_puts_every_prompt_at_the_right_edge():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_padded_prompt_continues_exactly_as_alone(model, tokenizer, prompts):
    """Greedy: the shortest prompt, left-padded in a batch with longer ones, gets the same tokens as on its own."""
    assert len({len(p) for p in prompts}) > 1, "the batch must need padding"
    greedy = Decoding(max_new_tokens=12, temperature=0.0)
    stops = stop_token_ids("llama3", tokenizer)
    batched = generate(model, tokenizer, prompts, stops, greedy, batch_size=len(prompts))
    for prompt, together in zip(prompts, batched):
        (alone,) = generate(model, tokenizer, [prompt], stops, greedy, batch_size=1)
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text


def test_same_seed_same_samples_other_seed_other_samples(model, tokenizer, prompts):
    stops = stop_token_ids("llama3", tokenizer)
    batch = prompts * 4

    def sample(seed):
        cfg = Decoding(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        return [c.token_ids for c in generate(model, tokenizer, batch, stops, cfg, batch_size=6)]

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    assert len({tuple(t) for t in first}) > len(prompts), "temperature 1 gives different samples of one prompt"


def test_completion_is_cut_at_the_first_stop_token(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    pad = tokenizer.pad_token_id
    ids = tokenizer.encode("12", add_special_tokens=False)
    cut = cut_at_stop([*ids, eot, *ids, pad, pad], [eot], pad, tokenizer)
    assert cut == Completion(ids, "12", True, eot)
    ran_out = cut_at_stop([*ids, *ids], [eot], pad, tokenizer)
    assert ran_out.token_ids == ids + ids and not ran_out.stopped and ran_out.stop_id is None


def test_generation_stops_at_the_templates_stop_tokens(model, tokenizer, prompts):
    """With the end-of-turn token made the only likely token after two steps, every row stops there: the completion
    excludes it and is flagged as stopped; with no stop token the rows run to max_new_tokens."""
    stops = stop_token_ids("llama3", tokenizer)
    eot = stops[0]
    forced = _ForceTokenAfter(model, eot, after=2)
    out = generate(forced, tokenizer, prompts, stops, Decoding(max_new_tokens=8), batch_size=3)
    assert all(c.stopped and c.stop_id == eot and len(c.token_ids) == 2 and eot not in c.token_ids for c in out)
    free = generate(model, tokenizer, prompts, [tokenizer.convert_tokens_to_ids("<|pad|>")],
                    Decoding(max_new_tokens=5), batch_size=3)
    assert all(len(c.token_ids) == 5 for c in free)


class _ForceTokenAfter(torch.nn.Module):
    """Wraps a causal LM so that from the ``after``-th generated token on, ``token`` has all the probability."""

    def __init__(self, model, token, after):
        super().__init__()
        self.model, self.token, self.after = model, token, after
        self.generation_config = model.generation_config

    def generate(self, input_ids, **kwargs):
        from transformers import LogitsProcessor, LogitsProcessorList

        prompt_len, token, after = input_ids.shape[1], self.token, self.after

        class Force(LogitsProcessor):
            def __call__(self, ids, scores):
                if ids.shape[1] - prompt_len >= after:
                    scores = torch.full_like(scores, -1e9)
                    scores[:, token] = 0.0
                return scores

        return self.model.generate(input_ids=input_ids, logits_processor=LogitsProcessorList([Force()]), **kwargs)
