from workers.cache import CachedCaption, CaptionCache
from workers.params import GenerationParams

BEAM2 = GenerationParams()
GREEDY = GenerationParams(beam_size=1)


def value(text: str) -> CachedCaption:
    return CachedCaption([text], None, 10, 20)


def test_same_bytes_and_params_hit_other_params_miss():
    cache = CaptionCache(4)
    cache.put(cache.key(b"img", BEAM2), value("a cat"))
    assert cache.get(cache.key(b"img", BEAM2)).captions == ["a cat"]
    assert cache.get(cache.key(b"img", GREEDY)) is None
    assert cache.get(cache.key(b"img2", BEAM2)) is None


def test_least_recently_used_is_evicted():
    cache = CaptionCache(2)
    for name in (b"a", b"b"):
        cache.put(cache.key(name, BEAM2), value(name.decode()))
    assert cache.get(cache.key(b"a", BEAM2)) is not None  # a is now the most recent
    cache.put(cache.key(b"c", BEAM2), value("c"))
    assert cache.get(cache.key(b"b", BEAM2)) is None
    assert cache.get(cache.key(b"a", BEAM2)) is not None
    assert len(cache) == 2


def test_unseeded_sampling_is_never_cached_and_size_zero_disables():
    sampled = GenerationParams(beam_size=1, do_sample=True)
    cache = CaptionCache(4)
    assert cache.key(b"img", sampled) is None
    seeded = GenerationParams(beam_size=1, do_sample=True, seed=3)
    assert cache.key(b"img", seeded) is not None
    off = CaptionCache(0)
    off.put(off.key(b"img", BEAM2), value("x"))
    assert off.get(off.key(b"img", BEAM2)) is None
