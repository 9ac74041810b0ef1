"""Your own data: a folder of text/JSONL files and a saved Hugging Face dataset become corpus
sources that train; an existing SentencePiece model is used as it is."""

import gzip
import json
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from mlflow import MlflowClient

from tests.conftest import CORPUS, ROOT
from tests.test_cli import smoke_args, xm2
from tests.test_errors import one_line_error
from xm2.data.corpus import read_documents, source_names, text_source_names
from xm2.data.shards import open_shard, write_shards
from xm2.data.sources import add_source, add_tokens
from xm2.errors import ConfigError, DataError


@pytest.fixture
def corpus(tmp_path):
    """An empty corpus (the bundled manifest, no source files) to add sources to."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(CORPUS / "manifest.json", folder)
    return folder


def real_documents(count: int) -> list[str]:
    """Real text to stand for the user's own: documents of the bundled held-out prose."""
    documents = list(read_documents(CORPUS, "prose", "val"))
    return documents[:count]


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "my_notes"
    (folder / "more").mkdir(parents=True)
    documents = real_documents(24)
    for index, text in enumerate(documents[:12]):
        (folder / f"note{index}.txt").write_text(text)
    with gzip.open(folder / "more" / "lines.jsonl.gz", "wt") as lines:
        for text in documents[12:]:
            lines.write(json.dumps({"body": text, "id": 1}) + "\n")
    return folder


@pytest.fixture
def saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    documents = real_documents(30)
    folder = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": documents[:24]}),
        "validation": datasets.Dataset.from_dict({"text": documents[24:]}),
    }).save_to_disk(str(folder))
    return folder


def test_text_folder_becomes_a_source(corpus, text_folder):
    add_source("notes", str(text_folder), str(corpus), text_field="body", licence="CC0")
    manifest = json.loads((corpus / "manifest.json").read_text())
    entry = manifest["sources"]["notes"]
    assert entry["licence"] == "CC0" and entry["train_docs"] + entry["val_docs"] == 24
    assert entry["kind"] == "pretraining"  # --kind, not the layout of the folder
    assert entry["val_docs"] >= 1
    assert "notes" in source_names(corpus)
    documents = [*read_documents(corpus, "notes", "train"), *read_documents(corpus, "notes", "val")]
    assert sorted(documents) == sorted(real_documents(24))


def test_saved_dataset_keeps_its_validation_split(corpus, saved_dataset):
    add_source("saved", str(saved_dataset), str(corpus))
    assert list(read_documents(corpus, "saved", "val")) == real_documents(30)[24:]
    assert len(list(read_documents(corpus, "saved", "train"))) == 24


def test_bad_source_inputs_are_named(corpus, text_folder, saved_dataset):
    with pytest.raises(ConfigError, match="source name 'My Notes'"):
        add_source("My Notes", str(text_folder), str(corpus))
    with pytest.raises(ConfigError, match="line 1 is not a JSON object with a 'text' field"):
        add_source("notes", str(text_folder), str(corpus))
    with pytest.raises(ConfigError, match="has no column 'body'; its columns: text"):
        add_source("saved", str(saved_dataset), str(corpus), text_field="body")
    add_source("saved", str(saved_dataset), str(corpus))
    with pytest.raises(ConfigError, match="source 'saved' is already in"):
        add_source("saved", str(saved_dataset), str(corpus))


def test_bad_text_settings_are_named(corpus, text_folder):
    with pytest.raises(ConfigError, match="encoding='utf-9' is not a text encoding Python knows"):
        add_source("notes", str(text_folder), str(corpus), encoding="utf-9")
    with pytest.raises(ConfigError, match="kind='book'; allowed: pretraining, instruction"):
        add_source("notes", str(text_folder), str(corpus), kind="book")
    (text_folder / "wide.txt").write_text("Written by Notepad.\n", encoding="utf-16")
    with pytest.raises(DataError, match="wide.txt starts with a UTF-16 byte-order mark but is "
                                        "read as utf-8; give --encoding utf-16"):
        add_source("notes", str(text_folder), str(corpus), text_field="body")


# Through the console script, with files as they come: other encodings, binary data, damage.

FRENCH = "Le café de la gare ouvre à sept heures.\nIl ferme à minuit, même le dimanche.\n"


def test_text_in_another_encoding_is_refused_by_file_and_line_then_read_with_encoding(
        tmp_path, corpus):
    folder = tmp_path / "letters"
    folder.mkdir()
    for index, text in enumerate(real_documents(3)):
        (folder / f"a{index}.txt").write_text(text)
    (folder / "b_french.txt").write_bytes(FRENCH.encode("latin-1"))
    refused = xm2("add-source", "letters", "letters", "--corpus_dir", "corpus", cwd=tmp_path)
    assert one_line_error(refused) == (
        "xm2: error: letters/b_french.txt line 1, column 7: byte 0xe9 is not valid utf-8; name "
        "the files' encoding with --encoding (e.g. latin-1, cp1252, utf-16) or convert the file "
        "to utf-8")
    assert "letters" not in source_names(corpus)
    (folder / "c_german.txt").write_text("Die Straße am Fluss.\n")  # UTF-8 among latin-1 files
    mixed = xm2("add-source", "letters", "letters", "--corpus_dir", "corpus",
                "--encoding", "latin-1", cwd=tmp_path)
    assert one_line_error(mixed) == (
        "xm2: error: letters/c_german.txt line 1 is UTF-8 text, not latin-1: read as latin-1 its "
        "'ß' would become 'Ã\\x9f'; if the folder mixes encodings, convert its latin-1 files to "
        "UTF-8 (iconv -f latin-1 -t utf-8) and add it without --encoding")
    (folder / "c_german.txt").unlink()
    # The other letters are ASCII, which latin-1 reads as UTF-8 does.
    added = xm2("add-source", "letters", "letters", "--corpus_dir", "corpus",
                "--encoding", "latin-1", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    documents = [*read_documents(corpus, "letters", "train"),
                 *read_documents(corpus, "letters", "val")]
    assert sorted(documents) == sorted([*real_documents(3), FRENCH])
    assert not any("\ufffd" in text for text in documents)


def test_binary_and_empty_inputs_are_skipped_and_counted(tmp_path, corpus):
    folder = tmp_path / "mixed"
    (folder / "lines").mkdir(parents=True)
    documents = real_documents(8)
    for index, text in enumerate(documents[:5]):
        (folder / f"note{index}.txt").write_text(text)
    shutil.copy(ROOT / "docs" / "mutransfer.png", folder / "figure.txt")  # a real binary file
    (folder / "noise.txt").write_bytes(random.Random(0).randbytes(4096))
    (folder / "blank.md").write_text("\n  \n")
    with open(folder / "lines" / "more.jsonl", "w") as lines:
        for text in [documents[5], "", documents[6], None, documents[7]]:
            lines.write(json.dumps({"text": text}) + "\n")
    added = xm2("add-source", "mixed", "mixed", "--corpus_dir", "corpus", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert added.stderr.splitlines()[1:3] == [
        "xm2: skipped 3 of 9 files: 1 empty (blank.md); 2 binary, with NUL bytes or control "
        "characters (figure.txt, noise.txt)",
        "xm2: skipped 2 of 10 documents: 2 with an empty text field"]
    stored = [*read_documents(corpus, "mixed", "train"), *read_documents(corpus, "mixed", "val")]
    assert sorted(stored) == sorted(documents)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("plain.jsonl.gz", b'{"text": "not compressed"}\n',
     "mixed/plain.jsonl.gz is not gzip-compressed (BadGzipFile: Not a gzipped file (b'{\"')); a "
     ".jsonl.gz file holds gzip-compressed JSON lines: compress it with gzip, or name a plain "
     "JSON-lines file .jsonl"),
    ("cut.jsonl.gz", gzip.compress("".join(json.dumps({"text": text}) + "\n" for text in
                                           real_documents(20)).encode(), mtime=0)[:30_000],
     "mixed/cut.jsonl.gz is damaged or cut short after line 16 (EOFError: Compressed file ended "
     "before the end-of-stream marker was reached); copy or write it again"),
    ("latin.jsonl", ('{"text": "ok"}\n' + json.dumps({"text": FRENCH}, ensure_ascii=False))
     .encode("latin-1"),
     "mixed/latin.jsonl line 2, column 17: byte 0xe9 is not valid utf-8; name the files' "
     "encoding with --encoding (e.g. latin-1, cp1252, utf-16) or convert the file to utf-8"),
])
def test_damaged_or_undecodable_json_lines_are_one_line(tmp_path, corpus, name, content, message):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / name).write_bytes(content)
    result = xm2("add-source", "mixed", "mixed", "--corpus_dir", "corpus", cwd=tmp_path)
    assert one_line_error(result) == f"xm2: error: {message}"


def their_tokenizer(folder):
    """A SentencePiece model trained outside xm2: BPE, other settings, xm2's special ids."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for text in real_documents(40) for line in text.split("\n")
                               if line.strip()),
        model_prefix=str(folder / "theirs"), model_type="bpe", vocab_size=600,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return folder / "theirs.model"


def test_an_existing_sentencepiece_model_is_used_as_is(tmp_path, corpus, text_folder):
    """A tokenizer trained elsewhere (here: BPE, other settings, xm2's special ids) is not
    retrained or converted: shards are written with it and read back."""
    model = their_tokenizer(tmp_path)
    add_source("notes", str(text_folder), str(corpus), text_field="body")
    directory = write_shards(corpus, model, tmp_path / "shards", ["notes"])
    tokens = np.asarray(open_shard(directory, "notes", "train"))
    processor = spm.SentencePieceProcessor(model_file=str(model))
    first = processor.encode(next(read_documents(corpus, "notes", "train")))
    assert tokens[:len(first)].tolist() == first and tokens[len(first)] == 2


def test_a_source_added_again_is_tokenized_again(tmp_path, corpus, text_folder, tokenizer_path,
                                                 capsys):
    add_source("notes", str(text_folder), str(corpus), text_field="body")
    directory = write_shards(corpus, tokenizer_path, tmp_path / "shards", ["notes"])
    other = tmp_path / "other_notes"
    other.mkdir()
    for index, text in enumerate(real_documents(30)[24:]):
        (other / f"note{index}.txt").write_text(text)
    add_source("notes", str(other), str(corpus), overwrite=True)
    capsys.readouterr()
    write_shards(corpus, tokenizer_path, tmp_path / "shards", ["notes"])
    announced = capsys.readouterr().err.splitlines()
    assert len(announced) == 2 and all(
        line.startswith(f"xm2: token shard {directory}/notes/{split}.bin was tokenized from "
                        "another version of its corpus file (sha256 ")
        and line.endswith(f"in the manifest); rewriting the shard from "
                          f"{corpus}/notes/{split}.jsonl.gz")
        for line, split in zip(announced, ("train", "val"), strict=True))
    encoder = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    tokens = [token for text in read_documents(corpus, "notes", "train")
              for token in (*encoder.encode(text), 2)]
    assert np.asarray(open_shard(directory, "notes", "train")).tolist() == tokens


@pytest.mark.slow
def test_new_sources_train_and_the_notebook_overlays_them(tmp_path, corpus, text_folder,
                                                          saved_dataset, tokenizer_path):
    for name, path, field in (("notes", text_folder, "body"), ("saved", saved_dataset, "text")):
        added = xm2("add-source", name, str(path), "--corpus_dir", str(corpus),
                    "--text_field", field, cwd=tmp_path)
        assert added.returncode == 0, added.stderr[-2000:]
    shards = tmp_path / "shards" / "unused"
    fit = xm2("fit", *smoke_args(tmp_path, tokenizer_path, shards),
              "--data.corpus_dir", str(corpus), "--data.stable", "{notes: 0.5, saved: 0.5}",
              "--data.decay", "{saved: 1.0}", "--data.val_batches_per_source", "1",
              "--trainer.logger.init_args.run_name", "own-data", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"val/loss_notes", "val/loss_saved", "mixture/stable/notes"} <= set(run.data.metrics)

    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "loss_curves.ipynb", as_version=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XM2_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
        patch.setenv("XM2_RUNS", "own-data")
        patch.setenv("XM2_X_AXIS", "tokens")
        NotebookClient(notebook, timeout=180, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                   for cell in notebook.cells for o in cell.get("outputs", []))
    assert "1 run(s) selected: own-data" in text
    assert "notes" in text and "saved" in text


def test_a_pretokenized_file_is_a_source(tmp_path, corpus, tokenizer_path, shards):
    encoder = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = [token for text in real_documents(20) for token in (*encoder.encode(text), 2)]
    np.save(tmp_path / "ids.npy", np.array(ids, dtype=np.int32))
    add_tokens("mine", str(tmp_path / "ids.npy"), str(tokenizer_path), corpus_dir=str(corpus),
               shards_dir=str(tmp_path / "shards"))
    assert "mine" in source_names(corpus) and "mine" not in text_source_names(corpus)
    directory = write_shards(corpus, tokenizer_path, tmp_path / "shards", ["mine"])  # nothing to do
    train, val = (np.asarray(open_shard(directory, "mine", split)) for split in ("train", "val"))
    assert [*train, *val] == ids and train[-1] == 2  # held out from a document boundary
    with pytest.raises(ConfigError, match="source 'mine' was added as token ids"):
        write_shards(corpus, their_tokenizer(tmp_path), tmp_path / "shards", ["mine"])
    with pytest.raises(ConfigError, match="outside .* vocabulary of 512"):
        np.save(tmp_path / "big.npy", np.array([1, 4000, 2]))
        add_tokens("big", str(tmp_path / "big.npy"), str(tokenizer_path), corpus_dir=str(corpus),
                   shards_dir=str(tmp_path / "shards"))
    damaged = directory / "mine" / "val.bin"
    damaged.write_bytes(damaged.read_bytes()[:4])
    with pytest.raises(DataError, match=rf"token shard {damaged} is damaged: 4 bytes, .*; source "
                                        "'mine' was added as token ids, so xm2 cannot write it "
                                        "again: add its tokens again with `xm2 add-tokens mine"):
        write_shards(corpus, tokenizer_path, tmp_path / "shards", ["mine"])
