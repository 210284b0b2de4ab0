"""The bundled suite: deterministic, verifiable, shipped files up to date, eval prompts unseen in training."""

import json

from finetune import suite


def test_verify_recomputes_answers_from_the_prompt():
    assert suite.verify("What is 7 + 5?", "12")
    assert suite.verify("What is 7 + 5?", " 12. ")
    assert not suite.verify("What is 7 + 5?", "13")
    assert suite.verify("Reverse the words: cat dog sun", "sun dog cat")
    assert suite.verify("Sort the words alphabetically: pear apple fig", "apple fig pear")
    assert suite.verify("How many letters are in the word 'banana'?", "6")
    assert suite.verify("Write in capital letters: owl", "OWL")
    assert not suite.verify("Write in capital letters: owl", "owl")
    assert suite.verify("Name the capital city of Peru.", "Lima")
    assert not suite.verify("Tell me a joke", "no")  # outside the suite: never right
    assert not suite.verify("What is the capital of Atlantis?", "Poseidonia")


def test_generation_is_deterministic_and_splits_are_disjoint():
    a, b = suite.generate(), suite.generate()
    assert a == b
    train = {r["prompt"] for r in a["train"]}
    assert len(a["eval"]) == suite.NUM_EVAL
    assert not train & {r["prompt"] for r in a["eval"]}
    assert {r["task"] for r in a["eval"]} == {"add", "reverse", "sort", "count", "upper", "capital"}


def test_wrong_answers_are_wrong_and_right_answers_right():
    for split in suite.generate().values():
        for r in split:
            assert suite.verify(r["prompt"], r["answer"]), r
            assert not suite.verify(r["prompt"], r["wrong"]), r


def test_shipped_sample_files_match_the_generator():
    for name, records in suite.sample_files().items():
        path = suite.SAMPLES_DIR / name
        shipped = [json.loads(line) for line in path.read_text().splitlines()]
        assert shipped == records, f"{name} is stale: run python -m finetune.suite --write"


def test_multiturn_chains_every_train_exchange_once_in_order():
    """Every train exchange appears once, in order, in conversations of 1 to 8 turns (both ends occur); the shipped
    file reads as chat messages."""
    from finetune.data import load_conversations

    train = suite.generate()["train"]
    conversations = suite.multiturn(train)
    turns = [len(c["tasks"]) for c in conversations]
    assert min(turns) == 1 and max(turns) == suite.MAX_TURNS
    flat = [m["content"] for c in conversations for m in c["messages"]]
    assert flat == [x for r in train for x in (r["prompt"], r["answer"])]
    assert all(c["answers"] == [m["content"] for m in c["messages"][1::2]] for c in conversations)
    loaded = load_conversations("bundled:suite_messages_multiturn_train.jsonl")
    assert len(loaded) == len(conversations) and loaded[0].messages == conversations[0]["messages"]


def test_pretraining_corpus_never_contains_an_eval_prompt():
    from finetune.tiny import pretraining_documents

    eval_prompts = {r["prompt"] for r in suite.generate()["eval"]}
    docs = pretraining_documents(count=3000)
    assert len(docs) == 3000
    assert all(d.startswith("Question:\n") for d in docs)
    assert not {d.split("\n")[1] for d in docs} & eval_prompts


def test_rl_prompts_are_new_where_the_families_allow_and_never_eval_prompts():
    splits = suite.generate()
    train, eval_prompts = {r["prompt"] for r in splits["train"]}, {r["prompt"] for r in splits["eval"]}
    rl = suite.rl_split()
    prompts = [r["prompt"] for r in rl]
    assert len(prompts) == len(set(prompts))
    assert not set(prompts) & eval_prompts
    by_family = {name: {r["prompt"] for r in rl if r["task"] == name} for name in suite.FAMILY_SIZES}
    assert len(by_family["sort"]) == len(by_family["reverse"]) == suite.NUM_RL_NEW_PROMPTS // 2
    assert not (by_family["sort"] | by_family["reverse"]) & train
    # The exhausted small families come from train, all of them.
    for name in ("add", "count", "upper", "capital"):
        assert by_family[name] == {r["prompt"] for r in splits["train"] if r["task"] == name}
    assert all(suite.verify(r["prompt"], r["answer"]) for r in rl)
    assert suite.rl_split() == rl


def test_test_prompts_are_new_word_lists_in_no_other_split_and_no_pretraining_document():
    from finetune.tiny import pretraining_documents

    splits = suite.generate()
    elsewhere = {r["prompt"] for split in splits.values() for r in split} | {r["prompt"] for r in suite.rl_split()}
    elsewhere |= {document.split("\n")[1] for document in pretraining_documents()}
    test = suite.test_split()
    prompts = [r["prompt"] for r in test]
    assert len(set(prompts)) == len(prompts) == suite.NUM_TEST
    assert not set(prompts) & elsewhere
    assert [r["task"] for r in test].count("sort") == [r["task"] for r in test].count("reverse") == suite.NUM_TEST // 2
    assert all(suite.verify(r["prompt"], r["answer"]) for r in test)
    assert suite.test_split() == test
