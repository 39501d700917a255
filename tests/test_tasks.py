import random

import pytest

import tasks
from tokenizer import Tokenizer, load_tokenizer, tokenizer_from_json, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    docs = [tasks.plain_document(ex) for ex in tasks.make_split(300, 0, "train", tasks.PRETRAIN_TEACHER)]
    docs += ["naïve café — 日本語のテキスト 😀 " * rng.randint(1, 3) for _ in range(20)]
    return train_tokenizer(docs, 400)


def random_unicode(rng, n):
    pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F),
             (0x300, 0x36F)]  # the last: combining marks
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    out += rng.choice(["\n", "\t", "  ", "\r\n", ""])
    return "".join(out)


def test_tokenizer_round_trips_arbitrary_unicode(tok):
    rng = random.Random()
    for _ in range(200):
        s = random_unicode(rng, rng.randint(0, 60))
        assert tok.decode(tok.encode(s)) == s
    s = "text with <|end|> and <|bos|> typed by a user"
    ids = tok.encode(s)
    assert tok.end_id not in ids and tok.bos_id not in ids  # never turned into control tokens
    assert tok.decode(ids) == s


def test_tokenizer_save_load_keeps_fingerprint(tok, tmp_path):
    tok.save(str(tmp_path / "tok.json"))
    again = load_tokenizer(str(tmp_path / "tok.json"))
    assert again.fingerprint == tok.fingerprint
    assert again.encode("Mia has 7 books.") == tok.encode("Mia has 7 books.")
    assert len({tok.bos_id, tok.user_id, tok.assistant_id, tok.end_id}) == 4
    assert tok.vocab_size == len(tok.mergeable_ranks) + 4


def test_digits_are_single_tokens(tok):
    ids = tok.encode("1234")
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4"]


# Expected values worked out by hand from lm-evaluation-harness's gsm8k.yaml: strict-match takes the
# FIRST "#### N" (N from -?[0-9.,]+, exactly one space after ####), then exact_match's regexes_to_ignore
# (",", "$", "(?s).*#### ", "\.$") and lower-casing. No numeric canonicalisation ("3.0" stays "3.0").
@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("#### 3.0", "3.0"),
    ("#### 18.", "18"),                       # one trailing period dropped
    ("#### 18 apples. Question: next", "18"),
    ("first #### 4 then #### 9", "4"),        # strict: the first
    ("#### $1,234.50", None),                 # '$' after '#### ' is not in the strict pattern
    ("####   42\n", None),                    # exactly one space
    ("#### - 12", None),
    ("#### .5", ".5"),
    ("no marker 42", None),
    ("#### none", None),
    ("####", None),
])
def test_extract_answer(text, expected):
    assert tasks.extract_answer(text) == expected


def test_exact_match_reward():
    assert tasks.exact_match_reward("blah\n#### 12", 12) == 1.0
    assert tasks.exact_match_reward("blah\n#### 1,200.", 1200) == 1.0
    assert tasks.exact_match_reward("blah\n#### 13", 12) == 0.0
    assert tasks.exact_match_reward("blah 12", 12) == 0.0          # strict needs '#### '
    assert tasks.exact_match_reward("blah 12", 12, mode="flexible") == 1.0
    assert tasks.exact_match_reward("#### 18", "She makes 9 * 2 = $18.\n#### 18") == 1.0  # a GSM8K reference


def test_splits_are_disjoint_and_heldout_is_correct():
    train = tasks.make_split(2000, 0, "train", tasks.SFT_TEACHER)
    held = tasks.make_split(200, 0, "heldout")
    assert not {e["question"] for e in train} & {e["question"] for e in held}
    for e in held:
        assert tasks.extract_answer(e["answer"]) == str(e["target"])
    # the SFT teacher makes its documented mistakes on training problems, the held-out set never
    wrong = sum(tasks.extract_answer(e["answer"]) != str(e["target"]) for e in train)
    assert 0.1 < wrong / len(train) < 0.5


def test_misread_rate_matches_documented_rate():
    rng = random.Random(7)
    n = wrong = 0
    while n < 3000:
        q, sol, ans = tasks.make_problem(rng, tasks.SFT_TEACHER)
        if " gives away " in q and "then" not in q:  # one-step problems with that verb
            n += 1
            wrong += tasks.extract_answer(sol) != str(ans)
    assert abs(wrong / n - tasks.SFT_TEACHER["misread"]["gives away"]) < 0.04


def test_chat_example_masks_only_the_assistant(tok):
    ids, mask = tasks.chat_example_ids(tok, "What is 2 + 2?", "2 + 2 = 4.\n#### 4")
    first = mask.index(1)
    assert ids[first - 1] == tok.assistant_id and ids[-1] == tok.end_id
    assert all(mask[first:]) and not any(mask[:first])
    assert tok.decode(ids[first:-1]) == "2 + 2 = 4.\n#### 4"


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2"):
        tasks.read_jsonl(str(p))
