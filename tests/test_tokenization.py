"""Prompt/continuation boundaries for the two tokenizer families real students use (issue "Real students").

Training rows and generation prompts must be the token sequence the tokenizer produces for the
whole text: the space after "Reasoning:" opens the continuation's first word, the target ends in
the answer then eos (no trailing space token), SentencePiece gets no doubled "▁", and a prompt cut
on the left keeps its BOS, in training as in generation."""
from __future__ import annotations

import pytest

import tasks
from generation import encode_prompts
from tokenizer_families import byte_level_bpe, sentencepiece
from train_data import PairEncoder, build_train_data

TASK = tasks.get_task("wordmath")
EX = tasks.Example("Tom has 3 apples. He buys 2 more. How many apples does Tom have?", "5",
                   rationale="Tom has 3 apples and buys 2, so 3 + 2 = 5. Therefore, the answer is 5.")
# family -> (space-led first word, answer token, lone-space token)
FAMILIES = {"byte_level_bpe": (byte_level_bpe, "ĠTom", "Ġ5", "Ġ"),
            "sentencepiece": (sentencepiece, "▁Tom", "▁5", "▁")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, data_dir):
    build, first_word, answer, lone_space = FAMILIES[request.param]
    train = tasks.load_split("wordmath", "train", str(data_dir))
    texts = [tasks.build_prompt(TASK, ex) + tasks.continuation(TASK, ex, ex.rationale) for ex in train]
    return request.param, build(texts + [tasks.build_prompt(TASK, EX) + tasks.continuation(TASK, EX, EX.rationale)]), \
        first_word, answer, lone_space


def ids(tokenizer, *tokens: str) -> list[int]:
    found = tokenizer.convert_tokens_to_ids(list(tokens))
    assert tokenizer.unk_token_id not in found or tokenizer.unk_token_id is None, tokens
    return found


def test_prompt_ends_at_the_colon_and_target_at_the_answer():
    prompt, target = tasks.build_prompt(TASK, EX), tasks.continuation(TASK, EX, EX.rationale)
    assert prompt.endswith("\nReasoning:") and target.startswith(" Tom has")
    assert target.endswith("\nAnswer: 5")


def test_training_row_is_the_whole_text_tokenized(family):
    name, tok, first_word, answer, lone_space = family
    prompt, target = tasks.build_prompt(TASK, EX), tasks.continuation(TASK, EX, EX.rationale)
    prefix_ids, cont_ids, truncated = PairEncoder(tok).pair(prompt, target, max_length=10_000)
    assert not truncated
    assert prefix_ids + cont_ids == tok(prompt + target)["input_ids"] + [tok.eos_token_id]
    assert prefix_ids == tok(prompt)["input_ids"]                  # what generation feeds the model
    assert prefix_ids[0] == tok.bos_token_id
    # the exact ids at both ends of the continuation
    assert prefix_ids[-1] != ids(tok, lone_space)[0]
    assert cont_ids[0] == ids(tok, first_word)[0]
    assert cont_ids[-2:] == ids(tok, answer) + [tok.eos_token_id]   # "... Answer: 5" then eos, no space token


def test_sentencepiece_alone_would_double_the_space(family):
    """Why the continuation is tokenized in context: alone, SentencePiece prefixes its own "▁"."""
    name, tok, first_word, _, lone_space = family
    alone = tok(tasks.continuation(TASK, EX, EX.rationale), add_special_tokens=False)["input_ids"]
    if name == "sentencepiece":
        assert alone[:2] == ids(tok, lone_space, first_word)
    else:
        assert alone[0] == ids(tok, first_word)[0]


def test_truncation_keeps_bos_in_training_and_generation(family):
    _, tok, _, answer, _ = family
    prompt, target = tasks.build_prompt(TASK, EX, rationale=False), tasks.continuation(TASK, EX, None)
    whole = tok(prompt)["input_ids"]
    prefix_ids, cont_ids, truncated = PairEncoder(tok).pair(prompt, target, max_length=8)
    assert cont_ids == ids(tok, answer) + [tok.eos_token_id]
    assert truncated and prefix_ids == whole[:1] + whole[-5:] and whole[0] == tok.bos_token_id
    generated_side = encode_prompts(tok, [prompt, "Question: x?\nAnswer:"], max_length=6)["input_ids"].tolist()
    assert generated_side[0] == prefix_ids                         # the same cut on both sides
    assert generated_side[1][-len(tok("Question: x?\nAnswer:")["input_ids"]):][0] == tok.bos_token_id


def test_train_data_rows_and_candidates_in_context(family, teacher_files, data_dir):
    """Every row, positive and negative of a real build is the tokenizer's own split of the whole text."""
    _, tok, _, _, _ = family
    train = tasks.load_split("wordmath", "train", str(data_dir))
    data = build_train_data(TASK, train, tok, teacher_data=str(teacher_files[0]), max_length=4096,
                            cl_pos_path=str(teacher_files[0]), cl_neg_path=str(teacher_files[1]))
    assert data.counts["continuations_tokenized_alone"] == 0
    by_question = {ex.question: ex for ex in train}
    for row in data.rows:
        prompt = tasks.build_prompt(TASK, by_question[data.questions[row.qid]])
        assert row.prefix_ids + row.cont_ids == tok(prompt + row.text)["input_ids"] + [tok.eos_token_id]
        for cand in data.negatives[row.qid] + data.positive_candidates(row):
            # the tokenizer's own split: re-encoding the decoded text gives the same ids back
            assert cand[-1] == tok.eos_token_id
            text = tok.decode(row.prefix_ids + cand[:-1], skip_special_tokens=True)
            assert tok(text)["input_ids"] == row.prefix_ids + cand[:-1]
    assert sum(map(len, data.negatives)) > 0 and sum(map(len, data.positives)) > 0
