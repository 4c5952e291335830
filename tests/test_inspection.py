"""Mask inspection: the page marks exactly the dropped tokens, and every statistic matches a brute-force count."""

import json
from collections import Counter
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from flows.inspect_cmd import inspect
from toss_core import inspection
from toss_core.config import SelectConfig
from toss_core.inspection import mask_report, write_html, write_pngs
from toss_core.models import load_tokenizer
from toss_core.selection import POSITION_BUCKETS, select_tokens
from toss_core.store import ArtifactStore
from toss_core.tables import TableError, ids_digest
from tests.factories import discard_rows, score_table, token_table, v2_mask, write_shards

LENGTHS = [12, 30, 7, 45, 20, 16, 9, 33, 25, 14, 40, 11]
HARMFUL = {1, 3, 7}


def _retokenized(tokens: pa.Table, vocab: int, harmful: set[int]) -> pa.Table:
    """Ids inside the tiny tokenizer's vocabulary (digests recomputed) and an is_harmful flag in meta."""
    ids = [(np.asarray(x) % (vocab - 3) + 3).astype(np.int32) for x in tokens.column("input_ids").to_pylist()]
    sids = tokens.column("sample_id").to_pylist()
    return tokens.set_column(1, "input_ids", pa.array(ids, pa.list_(pa.int32()))) \
        .set_column(3, "ids_digest", pa.array([ids_digest(x) for x in ids])) \
        .set_column(4, "meta", pa.array([json.dumps({"is_harmful": s in harmful, "id": f"q{s}"}) for s in sids]))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    """12 samples in shards; flagged samples get a low safety loss, so a high S, on most tokens."""
    tmp = tmp_path_factory.mktemp("inspect")
    tokens = _retokenized(token_table(LENGTHS, seed=3), len(tokenizer), HARMFUL)
    util = score_table(tokens, lambda s, p: ((s * 31 + p * 17) % 23) / 5.0)
    safe = score_table(tokens, lambda s, p: ((s * 7 + p * 13) % 19) / 5.0 - (2.0 if s in HARMFUL and p % 3 else 0.0)
                       - (3.0 if s == 3 and 20 <= p < 25 else 0.0))  # one run of 5 dropped tokens: trigrams
    files = SimpleNamespace(
        tokens=write_shards(tokens, tmp / "t", [5]), utility=write_shards(util, tmp / "u", [3, 8]),
        safety=write_shards(safe, tmp / "h", []), mask=[str(tmp / "mask.parquet")],
    )
    stats = select_tokens(files.tokens, files.utility, files.safety, SelectConfig(ratio=0.2), files.mask[0])
    return SimpleNamespace(files=files, stats=stats, tokens=tokens, util=util, safe=safe,
                           mask=pq.read_table(files.mask[0]), tmp=tmp)


def _report(data, tokenizer, **kw):
    f = data.files
    return mask_report(f.mask, f.tokens, tokenizer, utility_files=f.utility, safety_files=f.safety, **kw)


def _rows(data):
    """(sample_id, input_ids, response_mask, discard, score, is_harmful) per sample, as Python lists; the
    score is S = loss_u - loss_h of the score tables (the mask holds only the discarded positions)."""
    tok = data.tokens.to_pylist()
    scores = [(np.asarray(u, np.float64) - np.asarray(h, np.float64)).tolist()
              for u, h in zip(data.util.column("loss").to_pylist(), data.safe.column("loss").to_pylist())]
    return [(t["sample_id"], t["input_ids"], t["response_mask"], d, s, json.loads(t["meta"])["is_harmful"])
            for t, d, s in zip(tok, discard_rows(data.mask, data.tokens), scores)]


class _Page(HTMLParser):
    """Sample sections of the page, with the classes of their token spans, and any external reference."""

    def __init__(self):
        super().__init__()
        self.samples, self.external, self.open = [], [], Counter()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.open[tag] += tag in ("section", "span", "div", "table")
        if any((a.get(k) or "").startswith(("http:", "https:", "//")) for k in ("src", "href")) or tag == "link":
            self.external.append((tag, a))
        cls = (a.get("class") or "").split()
        if tag == "section" and "sample" in cls:
            self.samples.append({"id": int(a["data-id"]), "spans": [], "titles": []})
        elif tag == "span" and self.samples and ("r" in cls or "p" in cls):
            self.samples[-1]["spans"].append(cls)
            self.samples[-1]["titles"].append(a.get("title", ""))

    def handle_endtag(self, tag):
        self.open[tag] -= tag in ("section", "span", "div", "table")


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


# ---- the page -----------------------------------------------------------------------------------

def test_page_is_self_contained_and_shows_the_asked_number_of_samples(data, tokenizer, tmp_path):
    report = _report(data, tokenizer, samples=5)
    page = _parse(write_html(report, tmp_path / "r.html"))
    assert len(page.samples) == 5
    assert page.external == []  # opens offline: nothing fetched
    assert all(v == 0 for v in page.open.values())  # every section/span/div/table closed
    assert report.samples_total == len(LENGTHS)
    text = (tmp_path / "r.html").read_text()
    assert text.count('src="data:image/png;base64,') == 5  # four plots plus the is_harmful one
    assert 'id="q"' in text and "addEventListener" in text  # the search box and its filter


def test_every_dropped_token_is_struck_and_no_kept_one(data, tokenizer, tmp_path):
    page = _parse(write_html(_report(data, tokenizer, samples=len(LENGTHS)), tmp_path / "r.html"))
    rows = {r[0]: r for r in _rows(data)}
    assert {s["id"] for s in page.samples} == set(rows)
    for s in page.samples:
        _, _, resp, discard, score, _ = rows[s["id"]]
        response_spans = [c for c in s["spans"] if "r" in c]
        assert len(response_spans) == sum(resp)  # one span per response token
        assert ["d" in c for c in response_spans] == [d for d, r in zip(discard, resp) if r]
        assert not any("d" in c for c in s["spans"] if "p" in c)  # prompt text is never struck
        titles = [t for c, t in zip(s["spans"], s["titles"]) if "r" in c]
        assert all("loss_u" in t and "loss_h" in t and "position" in t for t in titles)
        first = next(p for p, r in enumerate(resp) if r)
        assert titles[0].startswith(f"S {score[first]:+.3f}")


def test_samples_ordered_by_dropped_count_then_share(data, tokenizer, tmp_path):
    counts = [(sid, sum(d), sum(r)) for sid, _, r, d, _, _ in _rows(data)]
    expected = [sid for sid, d, n in sorted(counts, key=lambda c: (-c[1], -c[1] / c[2], c[0]))][:7]
    report = _report(data, tokenizer, samples=7)
    assert [v.sample_id for v in report.shown] == expected
    assert [s["id"] for s in _parse(write_html(report, tmp_path / "r.html")).samples] == expected


def test_ids_selects_those_samples_and_rejects_unknown_ones(data, tokenizer):
    report = _report(data, tokenizer, ids=[3, 7, 9])
    assert sorted(v.sample_id for v in report.shown) == [3, 7, 9]
    shown = {v.sample_id: v for v in report.shown}
    for sid, ids, resp, discard, _, _ in _rows(data):
        if sid in shown:
            assert shown[sid].discard.tolist() == discard and shown[sid].response.tolist() == resp
            assert "".join(shown[sid].texts) == tokenizer.decode(ids)  # token texts add up to the conversation
    with pytest.raises(TableError, match=r"sample id\(s\) \[99\]"):
        _report(data, tokenizer, ids=[3, 99])


# ---- statistics ---------------------------------------------------------------------------------

def test_position_statistics_match_a_brute_force_count(data, tokenizer):
    total, dropped = Counter(), Counter()
    for _, _, resp, discard, _, _ in _rows(data):
        k = 0
        for p, r in enumerate(resp):
            k = k + 1 if r else 0  # position inside the assistant turn, 1-based
            if r:
                total[min(k, 257)] += 1
                dropped[min(k, 257)] += discard[p]
    report = _report(data, tokenizer)
    assert report.pos_total.tolist() == [total[k] for k in range(1, 258)]
    assert report.pos_dropped.tolist() == [dropped[k] for k in range(1, 258)]
    for lo, hi, label in POSITION_BUCKETS:
        in_bucket = [k for k in total if lo < k <= (hi or 10**9)]
        d, t = report.position_rates()[label]
        assert (d, t) == (sum(dropped[k] for k in in_bucket), sum(total[k] for k in in_bucket))
        assert d / t == pytest.approx(data.stats["discard_rate_by_position"][label])


def test_totals_histogram_and_cut_match_the_select_stats(data, tokenizer):
    report = _report(data, tokenizer)
    assert report.response_tokens == data.stats["response_tokens"]
    assert report.dropped_tokens == data.stats["discarded_tokens"]
    assert report.samples_touched == data.stats["samples_touched"]
    assert report.cut == pytest.approx(data.stats["score_cut"])
    assert report.hist_all.sum() == report.response_tokens and report.hist_dropped.sum() == report.dropped_tokens
    rows = _rows(data)
    shares = [sum(d) / sum(r) for _, _, r, d, _, _ in rows]
    assert report.share_zero + report.share_counts.sum() == len(rows)
    assert report.share_zero == sum(s == 0 for s in shares)


def test_top_tokens_ngrams_and_ground_truth_match_a_brute_force_count(data, tokenizer):
    tokens, grams, seen = Counter(), {2: Counter(), 3: Counter()}, Counter()
    drop_flagged = drop_all = resp_flagged = 0
    for _, ids, resp, discard, _, harmful in _rows(data):
        tokens.update(x for x, d in zip(ids, discard) if d)
        seen.update(x for x, r in zip(ids, resp) if r)
        for n in (2, 3):
            grams[n].update(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1) if all(discard[i:i + n]))
        drop_all += sum(discard)
        drop_flagged += sum(discard) if harmful else 0
        resp_flagged += sum(resp) if harmful else 0
    report = _report(data, tokenizer)
    top = report.top_tokens
    assert len(top) == min(20, len(tokens))
    assert all((x.count, x.total) == (tokens[x.ids[0]], seen[x.ids[0]]) for x in top)
    assert [x.count for x in top] == sorted((x.count for x in top), reverse=True)
    assert max(c for i, c in tokens.items() if i not in {x.ids[0] for x in top}) <= top[-1].count
    for n in (2, 3):
        assert 0 < len(grams[n]) <= 20  # small enough that the table holds every n-gram
        assert {x.ids: x.count for x in report.top_ngrams[n]} == dict(grams[n])
    t = report.truth
    assert (t.flagged_samples, t.labelled_samples) == (len(HARMFUL), len(LENGTHS))
    assert t.precision == pytest.approx(drop_flagged / drop_all)
    assert t.recall == pytest.approx(drop_flagged / resp_flagged)
    assert t.precision > t.random_precision  # the fixture gives flagged samples a high S


def test_small_batches_and_shards_give_the_same_statistics(data, tokenizer, monkeypatch):
    whole = _report(data, tokenizer)
    monkeypatch.setattr(inspection, "_ROWS", 2)  # n-grams, turns and counts must not depend on batch edges
    small = _report(data, tokenizer)
    for name in ("pos_total", "pos_dropped", "hist_all", "hist_dropped", "share_counts"):
        assert getattr(small, name).tolist() == getattr(whole, name).tolist()
    assert small.top_tokens == whole.top_tokens and small.top_ngrams == whole.top_ngrams
    assert small.truth == whole.truth and small.mean_losses == whole.mean_losses
    assert [v.sample_id for v in small.shown] == [v.sample_id for v in whole.shown]


def test_a_mask_in_the_earlier_layout_gives_the_same_page(data, tokenizer, tmp_path):
    """v2 masks (full-length discard flags and float32 scores) are read as they are: same statistics, same page."""
    old = tmp_path / "v2.parquet"
    pq.write_table(v2_mask(data.mask, data.tokens, data.util, data.safe), old)
    f = data.files
    pages = []
    for mask in (f.mask, [str(old)]):
        report = mask_report(mask, f.tokens, tokenizer, utility_files=f.utility, safety_files=f.safety,
                             samples=len(LENGTHS), context={"mask": "m"})
        pages.append(write_html(report, tmp_path / f"{len(pages)}.html").read_text())
    assert pages[0] == pages[1]
    assert len(_parse(tmp_path / "0.html").samples) == len(LENGTHS)


def test_without_score_tables_the_page_shows_drops_but_no_scores(data, tokenizer, tmp_path):
    report = mask_report(data.files.mask, data.files.tokens, tokenizer, samples=3)
    assert report.dropped_tokens == data.stats["discarded_tokens"]
    assert report.cut is None and report.hist_all.sum() == 0 and report.mean_losses is None
    page = _parse(write_html(report, tmp_path / "r.html"))
    titles = [t for s in page.samples for c, t in zip(s["spans"], s["titles"]) if "r" in c]
    assert titles and all(t.startswith("S n/a") for t in titles)


def test_pngs_are_written(data, tokenizer, tmp_path):
    paths = write_pngs(_report(data, tokenizer, samples=3), tmp_path / "png")
    assert sorted(p.name for p in paths) == ["discard_by_position.png", "ground_truth.png", "sample_drop_share.png",
                                            "score_histogram.png", "top_dropped.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# ---- a mask is never shown against another token table -------------------------------------------

def test_digest_mismatch_raises(data, tokenizer, tmp_path):
    ids = data.tokens.column("input_ids").to_pylist()
    ids[4] = [3 + (x - 2) % (len(tokenizer) - 3) for x in ids[4]]  # other tokens, same length
    other = data.tokens.set_column(1, "input_ids", pa.array(ids, pa.list_(pa.int32()))) \
        .set_column(3, "ids_digest", pa.array([ids_digest(x) for x in ids]))
    files = write_shards(other, tmp_path / "t", [])
    with pytest.raises(TableError, match="ids_digest of sample 4"):
        mask_report(data.files.mask, files, tokenizer)
    with pytest.raises(TableError, match="more samples than the tokens table"):
        mask_report(data.files.mask, write_shards(data.tokens.slice(0, 6), tmp_path / "short", []), tokenizer)


# ---- the command --------------------------------------------------------------------------------

def _app():
    app = typer.Typer()
    app.command()(inspect)
    app.command("noop")(lambda: None)  # two commands, so the subcommand name is part of the call
    return app


def _store(data, tiny_model_dir, root):
    """A store as the pipeline leaves it: the mask's manifest names its token table and score tables."""
    store = ArtifactStore(str(root))
    with store.writer("model", "m1", config={}, inputs={}) as w:
        w.put_dir(tiny_model_dir)
    with store.writer("tokens", "t1", config={}, inputs={"model": "m1"}) as w, w.open("tokens.parquet") as f:
        pq.write_table(data.tokens, f)
    for key, table in (("u1", data.util), ("h1", data.safe)):
        with store.writer("scores", key, config={}, inputs={"tokens": "t1"}) as w, w.open("scores.parquet") as f:
            pq.write_table(table, f)
    inputs = {"tokens": "t1", "utility0": "u1", "safety0": "h1"}
    with store.writer("mask", "k1", config={"mode": "global", "ratio": 0.2}, inputs=inputs) as w:
        with w.open("mask.parquet") as f:
            pq.write_table(data.mask, f)
    return root / "mask" / "k1"


def test_command_finds_tokens_tokenizer_and_scores_through_the_manifests(data, tiny_model_dir, tmp_path):
    mask_dir = _store(data, tiny_model_dir, tmp_path / "store")
    out, png = tmp_path / "report.html", tmp_path / "png"
    result = CliRunner().invoke(_app(), ["inspect", str(mask_dir), "--samples", "4", "--out", str(out),
                                         "--png-dir", str(png)])
    assert result.exit_code == 0, result.output
    page = _parse(out)
    assert len(page.samples) == 4
    assert all("loss_u" in t for s in page.samples for t, c in zip(s["titles"], s["spans"]) if "r" in c)
    assert len(list(png.glob("*.png"))) == 5

    result = CliRunner().invoke(_app(), ["inspect", str(mask_dir), "--ids", "2,5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(s["id"] for s in _parse(out).samples) == [2, 5]


def test_command_explains_what_is_missing(data, tmp_path):
    result = CliRunner().invoke(_app(), ["inspect", data.files.mask[0], "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2
    assert "Pass --tokens" in result.output
    result = CliRunner().invoke(_app(), ["inspect", data.files.mask[0], "--ids", "3,x"])
    assert result.exit_code == 2 and "--ids" in result.output
