import io
import json

import pytest

from teal_cli.errors import DataError
from teal_cli.records import Record, RecordWriter, Segment, parse_record, read_records


def _read(text: str, name: str = "t.jsonl"):
    return list(read_records(io.StringIO(text), name))


def test_round_trip_keeps_unknown_keys_and_order():
    line = {"v": 1, "id": "cat.png", "split": "train", "segments": [
        {"modality": "image", "codec": "patch-p4-k512", "shape": [2, 2], "tokens": [5, 9, 0, 1], "note": "x"},
        {"modality": "text", "text": "A cat."},
        {"modality": "audio", "codec": "mel-80-k256", "frame_rate": 100, "tokens": [3, 4], "durations": [2, 5]}]}
    (record,) = _read(json.dumps(line) + "\n")
    assert record.extra == {"split": "train"}
    assert record.segments[0].extra == {"note": "x"}
    assert json.loads(record.dumps()) == line


@pytest.mark.parametrize("line, message", [
    ('{"v": 1, "id": "a", "segments": [}', "t.jsonl:2: invalid JSON"),
    ('{"v": 2, "id": "a", "segments": []}', "t.jsonl:2: field 'v': record version 2 is newer"),
    ('{"v": 1, "segments": []}', "t.jsonl:2: field 'id': missing"),
    ('{"v": 1, "id": "a", "segments": [{"modality": "video"}]}', "field 'segments[0].modality': expected one of"),
    ('{"v": 1, "id": "a", "segments": [{"modality": "image", "codec": "c", "tokens": [1, "2"]}]}',
     "field 'segments[0].tokens[1]': expected an integer, got \"2\""),
    ('{"v": 1, "id": "a", "segments": [{"modality": "image", "codec": "c", "tokens": [1, -2]}]}',
     "field 'segments[0].tokens[1]': expected an integer >= 0, got -2"),
    ('{"v": 1, "id": "a", "segments": [{"modality": "image", "codec": "c", "shape": [2, 2], "tokens": [1]}]}',
     "field 'segments[0].shape': [2, 2] holds 4 tokens but 'tokens' has 1"),
    ('{"v": 1, "id": "a", "segments": [{"modality": "image", "tokens": [1]}]}', "field 'segments[0].codec'"),
    ('{"v": 1, "id": "a", "segments": [{"modality": "audio", "codec": "m", "tokens": [1, 2], "durations": [1]}]}',
     "field 'segments[0].durations': 1 entries for 2 tokens"),
    ('{"v": 1, "id": "a", "segments": [{"modality": "text"}]}', "field 'segments[0].text': expected a string"),
    ('[1, 2]', "t.jsonl:2: expected a JSON object per line, got list"),
    ('{"id": "a"}', "record has no 'segments' and no 'image', 'audio' or 'text' field"),
])
def test_errors_name_file_line_and_field(line, message):
    good = '{"v": 1, "id": "ok", "segments": [{"modality": "text", "text": "fine"}]}\n'
    with pytest.raises(DataError) as exc:
        _read(good + line + "\n")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_manifest_entries_become_segments_in_key_order():
    (record,) = _read('{"id": 7, "text": "seven", "image": ["a.png", "b.png"], "audio": "a.wav", "label": 7}\n')
    assert record.id == "7"
    assert [(s.modality, s.path or s.text) for s in record.segments] == [
        ("text", "seven"), ("image", "a.png"), ("image", "b.png"), ("audio", "a.wav")]


def test_reader_streams_lazily():
    def lines():
        yield '{"v": 1, "id": "a", "segments": []}\n'
        raise AssertionError("reader read ahead")

    it = read_records(lines(), "gen")
    assert next(it).id == "a"


def test_writer_flushes_each_record():
    class Spy(io.StringIO):
        flushes = 0

        def flush(self):
            Spy.flushes += 1

    out = Spy()
    writer = RecordWriter(out)
    writer.write(Record(id="a", segments=[Segment(modality="text", text="hi")]))
    writer.write(Record(id="b", segments=[]))
    assert Spy.flushes == 2
    assert [json.loads(l)["id"] for l in out.getvalue().splitlines()] == ["a", "b"]


def test_blank_lines_skipped_and_bool_tokens_rejected():
    assert _read("\n\n") == []
    with pytest.raises(DataError, match="expected an integer, got true"):
        parse_record({"id": "a", "segments": [{"modality": "image", "codec": "c", "tokens": [True]}]}, "x")


def test_byte_order_mark_and_non_utf8(tmp_path):
    (record,) = _read('\ufeff{"v": 1, "id": "a", "segments": []}\n')
    assert record.id == "a"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"v": 1, "id": "a", "segments": []}\n{"id": "\xff\xfe"}\n')
    with open(bad, "rb") as f, pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8 text"):
        list(read_records(f, "bad.jsonl"))
