"""The bundled instruction suite: small tasks with answers a program can check.

Every prompt carries enough information to recompute its answer, so :func:`verify` needs only the prompt and the
response. That makes the same function usable as an evaluation metric after SFT, as the scorer in rejection
sampling and as the reward in PPO.

The suite is generated deterministically from a fixed seed; the shipped files under ``data_formats/samples/`` are
its output (``python -m finetune.suite --write`` regenerates them, and a test checks they are up to date).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
NUM_EVAL = 200
RL_SEED = 7
NUM_RL_NEW_PROMPTS = 1000
TEST_SEED = 13
NUM_TEST = 2000
MULTITURN_SEED = 11
MAX_TURNS = 8

WORDS = (
    "apple bird cake door egg fish goat hat ink jam kite lamp moon nest owl pen queen rose sun tree "
    "umbrella vase wolf box yarn zebra bread cloud drum flag grape horse iron juice king leaf milk nut "
    "ocean pear quilt river snake tiger violin whale anchor basket candle dragon engine forest garden "
    "hammer island jacket kettle ladder mirror needle orange pillow rabbit saddle tomato valley window "
    "arrow bottle carpet desert eagle feather guitar helmet igloo jungle koala lemon magnet noodle "
    "parrot rocket silver turtle unicorn wagon yogurt zipper banana cherry donkey falcon ginger honey "
    "insect jelly lizard melon nickel olive peanut radish spider tulip velvet walnut bucket castle "
    "dolphin button cactus pepper planet"
).split()

# A fixed table: the lookup task is only fair if the facts are part of what the model sees in training.
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens",
    "Cuba": "Havana", "Chile": "Santiago", "Poland": "Warsaw", "Ireland": "Dublin", "Austria": "Vienna",
    "Portugal": "Lisbon", "Sweden": "Stockholm", "Finland": "Helsinki", "Canada": "Ottawa", "Russia": "Moscow",
}  # fmt: skip


@dataclass(frozen=True)
class Task:
    """One task family: how to phrase a prompt, recognise it again, and answer it."""

    name: str
    pattern: re.Pattern[str]

    def answer(self, match: re.Match[str]) -> str:
        """Recompute the expected answer from a prompt that matched :attr:`pattern`."""
        arg = match.group(1)
        if self.name == "add":
            a, b = (int(x) for x in match.groups())
            return str(a + b)
        if self.name == "reverse":
            return " ".join(reversed(arg.split()))
        if self.name == "sort":
            return " ".join(sorted(arg.split()))
        if self.name == "count":
            return str(len(arg))
        if self.name == "upper":
            return arg.upper()
        if self.name == "capital":
            return CAPITALS[arg]
        raise AssertionError(self.name)


TASKS = (
    Task("add", re.compile(r"^What is (\d+) \+ (\d+)\?$")),
    Task("reverse", re.compile(r"^Reverse the words: ([a-z ]+)$")),
    Task("sort", re.compile(r"^Sort the words alphabetically: ([a-z ]+)$")),
    Task("count", re.compile(r"^How many letters are in the word '([a-z]+)'\?$")),
    Task("upper", re.compile(r"^Write in capital letters: ([a-z]+)$")),
    Task("capital", re.compile(r"^What is the capital of ([A-Za-z]+)\?$")),
    Task("capital", re.compile(r"^Name the capital city of ([A-Za-z]+)\.$")),
    Task("capital", re.compile(r"^Which city is the capital of ([A-Za-z]+)\?$")),
)

# How many prompts of each family the suite holds; the small families hold every prompt there is.
FAMILY_SIZES = {"add": 400, "reverse": 850, "sort": 850, "count": len(WORDS), "upper": len(WORDS), "capital": 60}
CAPITAL_PHRASINGS = ("What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?")


def expected_answer(prompt: str) -> str | None:
    """The correct answer to a suite prompt, or ``None`` if the prompt is not one of the suite's tasks."""
    prompt = prompt.strip()
    for task in TASKS:
        match = task.pattern.match(prompt)
        if match and (task.name != "capital" or match.group(1) in CAPITALS):
            return task.answer(match)
    return None


def normalise(text: str) -> str:
    """Collapse whitespace and drop one trailing full stop, so '12.' and ' 12 ' count as '12'."""
    text = " ".join(text.split())
    return text[:-1] if text.endswith(".") else text


def verify(prompt: str, response: str) -> bool:
    """Whether ``response`` answers the suite ``prompt`` correctly (False for prompts outside the suite)."""
    answer = expected_answer(prompt)
    return answer is not None and normalise(response) == answer


def task_name(prompt: str) -> str | None:
    """Which task family a prompt belongs to."""
    for task in TASKS:
        if task.pattern.match(prompt.strip()):
            return task.name
    return None


def _family_prompts(rng: random.Random, name: str, size: int) -> list[str]:
    if name == "add":
        pool = [f"What is {a} + {b}?" for a in range(20) for b in range(20)]
    elif name == "count":
        pool = [f"How many letters are in the word '{w}'?" for w in WORDS]
    elif name == "upper":
        pool = [f"Write in capital letters: {w}" for w in WORDS]
    elif name == "capital":
        pool = [p.format(c) for c in sorted(CAPITALS) for p in CAPITAL_PHRASINGS]
    else:
        unique: dict[str, None] = {}
        while len(unique) < size:
            unique[_random_words_prompt(rng, name)] = None
        pool = list(unique)
    return rng.sample(pool, size)


def pretraining_prompts(count: int, seed: int, exclude: set[str]) -> list[tuple[str, str]]:
    """``count`` (prompt, answer) pairs drawn from the task families, none in ``exclude``; repeats allowed, since
    some families hold fewer prompts than a pretraining corpus wants."""
    rng = random.Random(seed)
    families = list(FAMILY_SIZES)
    pairs = []
    while len(pairs) < count:
        name = families[len(pairs) % len(families)]
        prompt = _family_prompts(rng, name, 1)[0] if name not in ("reverse", "sort") else _random_words_prompt(rng, name)
        if prompt not in exclude:
            pairs.append((prompt, expected_answer(prompt)))
    return pairs


def _random_words_prompt(rng: random.Random, name: str) -> str:
    verb = "Reverse the words:" if name == "reverse" else "Sort the words alphabetically:"
    return f"{verb} {' '.join(rng.sample(WORDS, 3))}"


def plausible_wrong_answer(prompt: str, rng: random.Random) -> str:
    """A wrong answer of the right shape: off by one, wrong order, another capital. Used as 'rejected'."""
    name, answer = task_name(prompt), expected_answer(prompt)
    assert name is not None and answer is not None, prompt
    if name in ("add", "count"):
        return str(int(answer) + rng.choice((-2, -1, 1, 2)) if int(answer) > 1 else int(answer) + 1)
    if name in ("reverse", "sort"):
        words = answer.split()
        while " ".join(words) == answer:
            rng.shuffle(words)
        return " ".join(words)
    if name == "upper":
        return answer.lower() if rng.random() < 0.5 else answer.capitalize()
    return rng.choice([c for c in sorted(CAPITALS.values()) if c != answer])


def generate(seed: int = SEED, num_eval: int = NUM_EVAL) -> dict[str, list[dict]]:
    """The suite as ``{"train": [...], "eval": [...]}`` of ``{"task", "prompt", "answer", "wrong"}`` records.

    Prompts are unique across both splits, so eval accuracy measures answering, not recall of the same line
    (a capital asked in eval is asked in other words in train).
    """
    rng = random.Random(seed)
    records = []
    for name, size in FAMILY_SIZES.items():
        for prompt in _family_prompts(rng, name, size):
            answer = expected_answer(prompt)
            records.append({"task": name, "prompt": prompt, "answer": answer, "wrong": plausible_wrong_answer(prompt, rng)})
    rng.shuffle(records)
    return {"train": records[num_eval:], "eval": records[:num_eval]}


def rl_split(seed: int = RL_SEED, num_new: int = NUM_RL_NEW_PROMPTS) -> list[dict]:
    """Prompts for rejection sampling and PPO, records shaped like :func:`generate`'s.

    Like Llama 2's RLHF batches, these are prompts the SFT model was not trained on wherever a family has more:
    ``num_new`` new word lists to sort or reverse, none in train or eval. The small families (add, count, upper,
    capital) are exhausted by train and eval, so their train prompts come along to keep those skills in the mix.
    Sampling the SFT train prompts instead teaches little: the SFT model answers 97% of them greedily (it has
    learned those answers) against 83.5% of held-out ones.
    """
    splits = generate()
    seen = {r["prompt"] for split in splits.values() for r in split}
    rng = random.Random(seed)
    new: dict[str, str] = {}
    while len(new) < num_new:
        name = ("sort", "reverse")[len(new) % 2]
        prompt = _random_words_prompt(rng, name)
        if prompt not in seen and prompt not in new:
            new[prompt] = name
    records = [r for r in splits["train"] if r["task"] not in new.values()]
    records += [{"task": name, "prompt": prompt, "answer": expected_answer(prompt)} for prompt, name in new.items()]
    random.Random(0).shuffle(records)
    return records


def test_split(seed: int = TEST_SEED, num: int = NUM_TEST) -> list[dict]:
    """A large held-out test set for reporting: ``num`` word lists to sort or reverse (half each), in no other split
    and in none of the tiny base's pretraining documents.

    The 200 eval prompts are few for telling models apart (one prompt is 0.5 points) and the pipeline's gate selects
    on them. Only these two families have prompts left to draw (2.3 million three-word lists); the small ones are
    used up by train and eval, so this set measures sorting and reversing, not the whole suite.
    """
    from .tiny import pretraining_documents

    splits = generate()
    seen = {r["prompt"] for split in splits.values() for r in split} | {r["prompt"] for r in rl_split()}
    seen |= {document.split("\n")[1] for document in pretraining_documents()}
    rng = random.Random(seed)
    records: dict[str, dict] = {}
    while len(records) < num:
        name = ("sort", "reverse")[len(records) % 2]
        prompt = _random_words_prompt(rng, name)
        if prompt not in seen and prompt not in records:
            records[prompt] = {"task": name, "prompt": prompt, "answer": expected_answer(prompt)}
    return list(records.values())


def multiturn(split: list[dict], seed: int = MULTITURN_SEED, max_turns: int = MAX_TURNS) -> list[dict]:
    """The split's exchanges, in order, chained into conversations of 1 to ``max_turns`` user/assistant turns (the
    count drawn uniformly), as chat-messages records with each turn's ``tasks`` and ``answers``.

    Every exchange appears once. The single-turn suite is 20 to 24 tokens a conversation, so batches of 8 are 97% real
    tokens and packing has nothing to remove; chat data runs from one turn to many (ShareGPT), and these, 21 to 182
    tokens, are what ``benchmarks/sft_throughput.py`` also measures on.
    """
    rng = random.Random(seed)
    conversations, start = [], 0
    while start < len(split):
        turns = split[start : start + rng.randint(1, max_turns)]
        start += len(turns)
        messages = [m for r in turns for m in ({"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r["answer"]})]
        conversations.append({"messages": messages, "tasks": [r["task"] for r in turns],
                              "answers": [r["answer"] for r in turns]})
    return conversations


SAMPLES_DIR = Path(__file__).resolve().parent.parent / "data_formats" / "samples"


def as_messages(split: list[dict]) -> list[dict]:
    """One split in the chat-messages format (records as plain JSON objects)."""
    return [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
         "task": r["task"], "answer": r["answer"]}
        for r in split
    ]


def as_formats(split: list[dict]) -> dict[str, list[dict]]:
    """One split rendered in each shipped data format (records as plain JSON objects)."""
    meta = [{"task": r["task"], "answer": r["answer"]} for r in split]
    return {
        "alpaca": [{"instruction": r["prompt"], "input": "", "output": r["answer"], **m} for r, m in zip(split, meta)],
        "sharegpt": [
            {"conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["answer"]}], **m}
            for r, m in zip(split, meta)
        ],
        "messages": as_messages(split),
        "preference": [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["answer"]}],
                "rejected": [{"role": "assistant", "content": r["wrong"]}],
                **m,
            }
            for r, m in zip(split, meta)
        ],
    }


def sample_files() -> dict[str, list[dict]]:
    """File name -> records, for every bundled sample file (``suite_<format>_<split>.jsonl``)."""
    files: dict[str, list[dict]] = {}
    for split_name, split in generate().items():
        for fmt, records in as_formats(split).items():
            files[f"suite_{fmt}_{split_name}.jsonl"] = records
    files["suite_messages_rl.jsonl"] = as_messages(rl_split())
    files["suite_messages_test.jsonl"] = as_messages(test_split())
    files["suite_messages_multiturn_train.jsonl"] = multiturn(generate()["train"])
    return files


def sample_path(fmt: str = "messages", split: str = "train") -> Path:
    """Path of a shipped sample file, e.g. ``sample_path("preference", "eval")``."""
    return SAMPLES_DIR / f"suite_{fmt}_{split}.jsonl"


def write_samples(directory: Path = SAMPLES_DIR) -> list[Path]:
    """Regenerate the shipped sample files."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, records in sample_files().items():
        path = directory / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m finetune.suite --write")
    for path in write_samples():
        print(path)
