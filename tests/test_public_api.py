import slipstream as ss


def test_all_is_sorted_and_exported() -> None:
    assert ss.__all__ == sorted(ss.__all__)
    for name in ss.__all__:
        assert hasattr(ss, name), name


def test_errors_share_one_root() -> None:
    for name in ss.__all__:
        obj = getattr(ss, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ss.SlipstreamError), name
