import base64
import collections
import json

import pytest
import sentencepiece as spm

from speechprompt.verbalizers import (
    EOS,
    NSPECIAL,
    SequenceVerbalizer,
    VerbalizerConfig,
    VerbalizerError,
    build_verbalizer,
    unit_ranking,
    verbalizer_from_dict,
)

K = 100
ASR = [
    "turn on the lights in the kitchen",
    "turn off the lights",
    "play some music  please",  # irregular spacing normalises away
    "bring me my shoes",
    "what is the weather like today",
    "set an alarm for seven in the morning",
    " increase the volume ",
]
SNIPS = [
    "add B-artist lil wayne E-artist to B-playlist my workout E-playlist",
    "play B-music_item a song E-music_item by B-artist adele E-artist",
    "book a table in B-city paris E-city for B-party_size_number two E-party_size_number",
    "what is the weather in B-city london E-city",
]
UNITS = [[4 + u] * (K - u) for u in range(K)]  # unit u is the u-th most frequent


def fit(texts=ASR, **kwargs):
    return SequenceVerbalizer.fit(texts, UNITS, K, **kwargs)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_round_trip_is_exact_on_normalised_text(model_type):
    v = fit(model_type=model_type)
    assert 0 < v.vocab_size <= K
    w = verbalizer_from_dict(json.loads(json.dumps(v.to_dict())))
    for text in ASR:
        ids = v.encode(text)
        assert all(NSPECIAL <= t < NSPECIAL + K for t in ids)
        assert v.decode(ids) == " ".join(text.split())
        assert w.encode(text) == ids and w.decode(ids) == " ".join(text.split())


def test_vocab_size_is_lowered_when_the_text_has_fewer_pieces():
    v = fit(model_type="unigram")
    assert v.vocab_size < K  # this tiny text cannot fill 100 unigram pieces
    assert fit(vocab_size=40).vocab_size == 40


def test_pieces_map_to_units_by_frequency_rank():
    v = fit()
    counts = collections.Counter(p for text in ASR for p in v.sp.encode(" ".join(text.split())))
    ranked_pieces = sorted(range(v.vocab_size), key=lambda p: (-counts[p], p))
    ranked_units = unit_ranking(UNITS, K)
    pieces = v.pieces()
    for rank, piece in enumerate(ranked_pieces):
        assert pieces[piece][1] + NSPECIAL == ranked_units[rank]
    # The most frequent piece is the most frequent unit (unit 0 = token 4).
    assert pieces[ranked_pieces[0]][1] == 0
    units = [u for _, u in pieces]
    assert len(set(units)) == len(units)


def test_slot_tags_stay_whole():
    v = fit(SNIPS, tag_pattern=r"[BE]-\S+")
    pieces = v.sp.encode(SNIPS[0], out_type=str)
    for tag in ("B-artist", "E-artist", "B-playlist", "E-playlist"):
        assert tag in pieces
    for text in SNIPS:
        assert v.decode(v.encode(text)) == text
    explicit = fit(SNIPS, user_symbols=["B-city", "E-city"])
    assert "B-city" in explicit.sp.encode(SNIPS[3], out_type=str)


def test_decode_stops_at_eos_and_drops_non_pieces():
    v = fit(vocab_size=40)
    ids = v.encode("turn on the lights")
    assert v.decode(ids + [EOS] + ids) == "turn on the lights"
    used = {u for _, u in v.pieces()}
    unused = next(u + NSPECIAL for u in range(K) if u not in used)  # 60 of the 100 units have no piece
    assert v.decode([0, 1, 3, unused, *ids]) == "turn on the lights"
    with pytest.raises(VerbalizerError, match="token id 0 is no sentencepiece piece"):
        v.decode([0, *ids], strict=True)


def test_unseen_characters_become_the_unknown_piece():
    v = fit()
    assert "⁇" in v.decode(v.encode("zebra quiz"))  # z and q never occur in training


def test_fit_is_deterministic():
    assert fit().to_dict() == fit().to_dict()


def test_too_few_units_for_the_characters():
    with pytest.raises(VerbalizerError, match=r"needs at least \d+ pieces .* only 10 are allowed with 10 units"):
        SequenceVerbalizer.fit(ASR, [[4]], 10)


def test_interface_and_stored_model():
    v = fit()
    assert v.labels == [] and v.target_length is None
    with pytest.raises(VerbalizerError, match="no fixed candidates"):
        v.candidates()
    d = v.to_dict()
    model = spm.SentencePieceProcessor(model_proto=base64.b64decode(d["sentencepiece_model"]))
    assert model.get_piece_size() == len(d["piece_to_unit"]) == v.vocab_size
    v.check_vocab(K + NSPECIAL)
    with pytest.raises(VerbalizerError, match="built for 100 units but the model has 50"):
        v.check_vocab(54)
    with pytest.raises(VerbalizerError, match="cannot be read"):
        verbalizer_from_dict({**d, "sentencepiece_model": "not base64!"})


def test_build_from_config():
    cfg = VerbalizerConfig(kind="sequence", sp_model_type="bpe", sp_vocab_size=50, tag_pattern=r"[BE]-\S+")
    v = build_verbalizer(cfg, SNIPS, UNITS, K)
    assert isinstance(v, SequenceVerbalizer) and v.vocab_size == 50
    assert v.decode(v.encode(SNIPS[1])) == SNIPS[1]
