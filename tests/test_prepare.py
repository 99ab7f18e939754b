"""
prepare.py end to end on small local corpora: every input format gives back its documents, each followed
by <|endoftext|>; a trained vocabulary; cleaning; one clear error per bad input; resuming after a crash.

    python -m pytest tests/test_prepare.py -q
"""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from data import TokenDataset
from tokenizer import EOT, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCS = [f"Story {i}: once upon a time a café ☕ held {i * i} cups.\nThe end of story {i}, naïve and 日本語."
        for i in range(60)]


def prep(tmp_path, *options, name="t"):
    """Run prepare.py in-process into tmp_path/out/<name>; return that directory."""
    prepare.main([*options, f"--out_dir={tmp_path / 'out'}", f"--name={name}"])
    return str(tmp_path / "out" / name)


def read_docs(out_dir):
    """The documents of each split, decoded back from the token files (each must end in <|endoftext|>)."""
    ds = TokenDataset(out_dir)
    tok = ds.load_tokenizer()
    docs = {}
    for split, ids in ds.splits.items():
        ids = np.asarray(ids).tolist()
        assert not ids or ids[-1] == ds.eot_token, f"{split} does not end with {EOT}"
        ends = [i for i, t in enumerate(ids) if t == ds.eot_token]
        starts = [0] + [e + 1 for e in ends[:-1]]
        docs[split] = [tok.decode(ids[s:e], errors="strict") for s, e in zip(starts, ends)]
    return docs


def expected_split(docs, fraction=0.1, seed=1337):
    to_val = prepare.val_mask(np.arange(len(docs)), seed, fraction)
    return ([d for d, v in zip(docs, to_val) if not v], [d for d, v in zip(docs, to_val) if v])


def check_output(out_dir, docs, fraction=0.1, seed=1337):
    train, val = expected_split(docs, fraction, seed)
    assert train and val, "the test corpus should fill both splits"
    got = read_docs(out_dir)
    assert got["train"] == train
    assert got["val"] == val
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    for split, texts in (("train", train), ("val", val)):
        assert meta["splits"][split]["documents"] == len(texts)
        assert meta["splits"][split]["bytes"] == sum(len(t.encode()) for t in texts)
    assert not os.path.exists(os.path.join(out_dir, prepare.STATE_FILE))
    assert sorted(os.listdir(out_dir)) == sorted(["meta.json", "train.bin", "val.bin"]
                                                 + (["tokenizer.special.json", "tokenizer.tiktoken"]
                                                    if meta["tokenizer_file"] else []))
    return meta


def write_eot_txt(path, docs):
    text = "".join(d + "\n" + EOT + "\n" for d in docs)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return str(path)


# --- the split --------------------------------------------------------------------------------------------

def test_val_mask_depends_on_seed_and_index_only():
    indices = np.arange(20000)
    mask = prepare.val_mask(indices, 1337, 0.1)
    assert 0.09 < mask.mean() < 0.11
    np.testing.assert_array_equal(prepare.val_mask(indices[5000:7000], 1337, 0.1), mask[5000:7000])
    assert not np.array_equal(prepare.val_mask(indices, 1338, 0.1), mask)
    assert not prepare.val_mask(indices, 1337, 0.0).any()


# --- every input format -----------------------------------------------------------------------------------

def test_txt_eot_separated(tmp_path):
    path = write_eot_txt(tmp_path / "stories.txt", DOCS)
    meta = check_output(prep(tmp_path, f"--input={path}"), DOCS)
    gpt2 = Tokenizer.gpt2()
    assert meta["tokenizer"] == "gpt2" and meta["tokenizer_hash"] == gpt2.content_hash
    assert meta["n_vocab"] == 50257 and meta["eot_token"] == 50256 and meta["dtype"] == "uint16"
    assert meta["source"]["input"] == [path]


def test_txt_eot_with_crlf_and_stray_separators(tmp_path):
    path = tmp_path / "stories.txt"
    text = "\r\n".join(["", EOT, "first\r\nstory", EOT, EOT, "  ", EOT, "second", EOT, "third, no separator"])
    path.write_bytes(("\ufeff" + text).encode())
    out = prep(tmp_path, f"--input={path}", "--val_fraction=0")
    assert read_docs(out) == {"train": ["first\nstory", "second", "third, no separator"], "val": []}
    assert json.load(open(os.path.join(out, "meta.json")))["dropped_documents"] == 3


def test_txt_blankline_separated(tmp_path):
    paragraphs = [d.replace("\n", " ") for d in DOCS]
    path = tmp_path / "paragraphs.txt"
    path.write_text("\n\n".join(paragraphs) + "\n\n\n", encoding="utf-8")
    check_output(prep(tmp_path, f"--input={path}", "--separator=blankline"), paragraphs)


def test_txt_gz(tmp_path):
    path = write_eot_txt(tmp_path / "stories.txt.gz", DOCS)
    check_output(prep(tmp_path, f"--input={path}"), DOCS)


def test_jsonl(tmp_path):
    docs = DOCS + [f"a literal {EOT} inside a document stays text"]
    path = write_jsonl(tmp_path / "stories.jsonl", docs, field="story")
    check_output(prep(tmp_path, f"--input={path}", "--text_field=story"), docs)


def test_parquet_in_several_row_groups(tmp_path):
    path = str(tmp_path / "stories.parquet")
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), path, row_group_size=7)
    assert pq.ParquetFile(path).num_row_groups > 1
    check_output(prep(tmp_path, f"--input={path}"), DOCS)


def test_several_inputs_and_val_input(tmp_path):
    a = write_eot_txt(tmp_path / "a.txt", DOCS[:20])
    b = write_jsonl(tmp_path / "b.jsonl", DOCS[20:40])
    val = write_eot_txt(tmp_path / "val.txt", DOCS[40:])
    out = prep(tmp_path, "--input", a, b, "--val_input", val)
    assert read_docs(out) == {"train": DOCS[:40], "val": DOCS[40:]}


def test_input_given_twice_with_equals_keeps_both(tmp_path):
    a = write_eot_txt(tmp_path / "a.txt", DOCS[:30])
    b = write_eot_txt(tmp_path / "b.txt", DOCS[30:])
    args = prepare.build_parser().parse_args([f"--input={a}", f"--input={b}"])
    assert args.input == [a, b]
    check_output(prep(tmp_path, f"--input={a}", f"--input={b}"), DOCS)


def test_default_name_is_the_input_stem(tmp_path, monkeypatch):
    path = write_eot_txt(tmp_path / "mystories.txt.gz", DOCS)
    monkeypatch.chdir(tmp_path)
    prepare.main([f"--input={path}", "--out_dir=out"])
    assert os.path.isfile(tmp_path / "out" / "mystories" / "meta.json")


def test_bundled_corpus_split(tmp_path):
    """The bundled train.txt's 4,043 stories split by seed; the extra stories all go to train, after them, so the
    val split is what it was without them."""
    out = prep(tmp_path, "--dataset=bundled")
    stories = list(prepare.read_txt(prepare.BUNDLED, "eot"))
    extra = list(prepare.read_stories_from_paragraphs(prepare.BUNDLED_EXTRA))
    assert len(stories) == 4043 and 700 < len(extra) < 900
    train, val = expected_split(stories)
    assert 300 < len(val) < 500
    docs = read_docs(out)
    assert docs["val"] == val
    assert docs["train"] == train + extra
    assert docs["train"][0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert extra[1].startswith("Once upon a time, in a big forest, there lived a rhinoceros named Roxy.")
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["splits"]["train"]["documents"] == len(train) + len(extra)


def test_stories_from_paragraphs(tmp_path):
    """A paragraph that opens with "Once" starts a story; the others join the one before, a line each."""
    text = ("the end of a story cut off.\n\nOnce upon a time, a cat.\n\nThe cat sat.\n\n\n"
            "Once there was a dog.\n\nIt ran.\nIt stopped.\n\nLily and Ben played.\n")
    path = tmp_path / "paragraphs.txt"
    path.write_text(text)
    assert list(prepare.read_stories_from_paragraphs(str(path))) == [
        "the end of a story cut off.", "Once upon a time, a cat.\nThe cat sat.",
        "Once there was a dog.\nIt ran.\nIt stopped.\nLily and Ben played."]


# --- a trained vocabulary, and cleaning ------------------------------------------------------------------

def test_vocab_size_trains_on_the_train_split(tmp_path):
    to_val = prepare.val_mask(np.arange(len(DOCS)), 1337, 0.1)
    docs = [d + " zyzzyva" * 30 * bool(v) for d, v in zip(DOCS, to_val)]  # a word only val has
    path = write_eot_txt(tmp_path / "stories.txt", docs)
    out = prep(tmp_path, f"--input={path}", "--vocab_size=300")
    meta = check_output(out, docs)
    tok = Tokenizer.load(os.path.join(out, "tokenizer.tiktoken"))
    assert tok.n_vocab == meta["n_vocab"] == 300 and meta["eot_token"] == tok.eot_token == 299
    assert meta["tokenizer_file"] == "tokenizer.tiktoken" and meta["tokenizer_hash"] == tok.content_hash
    assert TokenDataset(out, tokenizer=tok).load_tokenizer().content_hash == tok.content_hash
    train, _ = expected_split(docs)
    assert tok.content_hash == Tokenizer.train(train, 300, special_tokens=[EOT]).content_hash
    assert tok.content_hash != Tokenizer.train(docs, 300, special_tokens=[EOT]).content_hash
    check_output(prep(tmp_path, f"--input={path}"), docs)  # back to GPT-2: the old vocabulary goes


def test_normalize_and_lowercase(tmp_path):
    raw = ["  Hello\t\tWorld  \r\nLine two   \n\n\n\n\nE\u0301TE\u0301 cafe\u0301  ", " \t \n ", "Plain Text"]
    path = write_jsonl(tmp_path / "messy.jsonl", raw * 20)
    out = prep(tmp_path, f"--input={path}", "--normalize", name="n")
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["options"]["normalize"] and meta["dropped_documents"] == 20
    docs = read_docs(out)
    assert set(docs["train"] + docs["val"]) == {"Hello World\nLine two\n\nÉTÉ café", "Plain Text"}
    out = prep(tmp_path, f"--input={path}", "--normalize", "--lowercase", name="nl")
    docs = read_docs(out)
    assert set(docs["train"] + docs["val"]) == {"hello world\nline two\n\nété café", "plain text"}
    out = prep(tmp_path, f"--input={path}", name="raw")  # cleaning is off by default
    docs = read_docs(out)
    assert raw[0] in docs["train"] + docs["val"]


# --- bad input: one clear line, and nothing lost ---------------------------------------------------------

def error_of(tmp_path, *options):
    with pytest.raises(SystemExit) as e:
        prep(tmp_path, *options)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert not os.path.exists(tmp_path / "out" / "t"), "a failed run left files behind"
    return message


def test_missing_file(tmp_path):
    assert "no such file" in error_of(tmp_path, f"--input={tmp_path / 'nope.txt'}")


def test_unknown_extension(tmp_path):
    (tmp_path / "table.csv").write_text("text\nhello\n")
    assert "unsupported file type" in error_of(tmp_path, f"--input={tmp_path / 'table.csv'}")


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(f"{EOT}\n\n{EOT}\n")
    assert "corpus is empty" in error_of(tmp_path, f"--input={path}")


def test_empty_corpus_with_vocab_size(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(f"{EOT}\n\n{EOT}\n")
    assert "corpus is empty" in error_of(tmp_path, f"--input={path}", "--vocab_size=300")


def test_one_document_txt_hints_at_blankline(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(DOCS))
    assert "--separator=blankline" in error_of(tmp_path, f"--input={path}")


def test_a_document_too_long_to_hold_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 500)  # no separator line in sight after this many characters
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(DOCS))
    message = error_of(tmp_path, f"--input={path}")
    assert "a document longer than 500 characters" in message and "--separator=blankline" in message
    check_output(prep(tmp_path, f"--input={path}", "--separator=blankline"), DOCS)


def test_unreadable_parquet_rows_are_one_clear_error(tmp_path):
    path = str(tmp_path / "bad.parquet")
    text = pa.array([b"fine story", b"bad \xff byte"], pa.binary()).view(pa.string())  # not UTF-8 inside
    pq.write_table(pa.table({"text": text}), path)
    message = error_of(tmp_path, f"--input={path}")
    assert "cannot read" in message and "bad.parquet" in message
    assert not os.path.exists(tmp_path / "out" / "t" / prepare.STATE_FILE)


def test_non_utf8_file_names_the_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("good line\n".encode() + "caf\xe9 au lait\n".encode("latin-1"))
    message = error_of(tmp_path, f"--input={path}")
    assert "latin1.txt:2: not valid UTF-8" in message and "byte 13" in message


def test_bad_jsonl_lines_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    assert "bad.jsonl:3: not valid JSON" in error_of(tmp_path, f"--input={path}")
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert "bad.jsonl:2: no 'text' field" in error_of(tmp_path, f"--input={path}")


def test_vocab_too_large(tmp_path):
    path = write_eot_txt(tmp_path / "stories.txt", DOCS)
    assert "does not fit in uint32" in error_of(tmp_path, f"--input={path}", f"--vocab_size={2**32 + 1}")
    assert "too large" in error_of(tmp_path, f"--input={path}", f"--vocab_size={2**31}")
    assert "too small" in error_of(tmp_path, f"--input={path}", "--vocab_size=100")


def test_failed_rerun_keeps_the_previous_output(tmp_path, monkeypatch):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    out = prep(tmp_path, f"--input={good}")
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    bad = tmp_path / "good.jsonl"
    bad.write_text(open(good).read() + "not json\n")
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 500)  # the error comes after chunks were written
    with pytest.raises(SystemExit, match=r"good.jsonl:61: not valid JSON"):
        prep(tmp_path, f"--input={bad}", "--lowercase")
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before


def test_tinystories_offline_fails_fast_with_the_alternatives(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # no cache to fall back on
    result = subprocess.run([sys.executable, "prepare.py", f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--dataset=bundled" in result.stderr and "--input=PATH" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out" / "tinystories")


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(prepare.DataError, match="--dataset=bundled"):
        prepare.check_hub_reachable(timeout=2)


# --- resuming ---------------------------------------------------------------------------------------------

def interrupt_after(monkeypatch, n_states):
    """Crash the run as it records its n_states-th state: after a chunk's tokens are appended, before the
    state says so (the worst moment: the files hold more than the state records)."""
    real = prepare.Output.write_state
    calls = []

    def write_state(self, state):
        calls.append(1)
        if len(calls) == n_states:
            raise KeyboardInterrupt("simulated crash")
        real(self, state)

    monkeypatch.setattr(prepare.Output, "write_state", write_state)


def files_of(out_dir):
    return {f: open(os.path.join(out_dir, f), "rb").read() for f in sorted(os.listdir(out_dir))}


@pytest.mark.parametrize("options", [[], ["--vocab_size=300"]])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys, options):
    path = write_eot_txt(tmp_path / "stories.txt", DOCS * 5)
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 2000)
    reference = files_of(prep(tmp_path, f"--input={path}", *options, name="reference"))

    with monkeypatch.context() as m:
        interrupt_after(m, 4)  # state 1 is the start, 2 and 3 record chunks 1 and 2, chunk 3 is lost
        with pytest.raises(KeyboardInterrupt):
            prep(tmp_path, f"--input={path}", *options)
    out = str(tmp_path / "out" / "t")
    state = json.load(open(os.path.join(out, prepare.STATE_FILE)))
    assert 0 < state["passes"]["input"]["documents_read"] < len(DOCS) * 5
    assert not os.path.exists(os.path.join(out, "meta.json"))

    capsys.readouterr()
    prep(tmp_path, f"--input={path}", *options)
    assert "resuming" in capsys.readouterr().out
    assert files_of(out) == reference


def test_resume_skips_a_finished_split(tmp_path, monkeypatch, capsys):
    train = write_eot_txt(tmp_path / "train.txt", DOCS * 3)
    val = write_eot_txt(tmp_path / "val.txt", DOCS * 3)
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 2000)
    reference = files_of(prep(tmp_path, f"--input={train}", f"--val_input={val}", name="reference"))
    with monkeypatch.context() as m:
        interrupt_after(m, 12)  # the train pass takes 1 + 5 chunks + 1 (done) states: this is in the val pass
        with pytest.raises(KeyboardInterrupt):
            prep(tmp_path, f"--input={train}", f"--val_input={val}")
    out = str(tmp_path / "out" / "t")
    state = json.load(open(os.path.join(out, prepare.STATE_FILE)))
    assert state["passes"]["input"]["done"] and not state["passes"]["val_input"]["done"]

    opened = []
    real_read_files = prepare.read_files
    monkeypatch.setattr(prepare, "read_files", lambda paths, args: opened.append(paths) or real_read_files(paths, args))
    prep(tmp_path, f"--input={train}", f"--val_input={val}")
    assert opened == [[val]], "the finished train split was read again"
    assert files_of(out) == reference


def test_other_options_start_over(tmp_path, monkeypatch, capsys):
    path = write_eot_txt(tmp_path / "stories.txt", DOCS * 5)
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 2000)
    reference = files_of(prep(tmp_path, f"--input={path}", "--lowercase", name="reference"))
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            prep(tmp_path, f"--input={path}")
    capsys.readouterr()
    out = prep(tmp_path, f"--input={path}", "--lowercase")
    assert "starting over" in capsys.readouterr().out
    assert files_of(out) == reference


def fake_tinystories(fail_at=None):
    """A stand-in for the hub: TinyStories' train and validation splits, the train download failing at
    story fail_at."""
    def read_tinystories(split):
        for i, doc in enumerate(DOCS * 3 if split == "train" else DOCS[:10]):
            if split == "train" and i == fail_at:
                raise prepare.DownloadError("the download failed (simulated)")
            yield f"{split} {doc}"
    return read_tinystories


def test_tinystories_download_failure_half_way_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "check_hub_reachable", lambda: None)
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 2000)
    monkeypatch.setattr(prepare, "read_tinystories", fake_tinystories())
    reference = files_of(prep(tmp_path, "--dataset=tinystories", name="reference"))
    docs = read_docs(str(tmp_path / "out" / "reference"))
    assert docs == {"train": [f"train {d}" for d in DOCS * 3], "val": [f"validation {d}" for d in DOCS[:10]]}

    monkeypatch.setattr(prepare, "read_tinystories", fake_tinystories(fail_at=100))
    with pytest.raises(SystemExit, match="download failed"):
        prep(tmp_path, "--dataset=tinystories")
    monkeypatch.setattr(prepare, "read_tinystories", fake_tinystories())
    capsys.readouterr()
    out = prep(tmp_path, "--dataset=tinystories")
    assert "resuming" in capsys.readouterr().out
    assert files_of(out) == reference
