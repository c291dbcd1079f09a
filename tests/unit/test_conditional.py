"""RFC 9110 §13 conditional requests: parsing, §13.2.2 evaluation, write preconditions."""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from casledger.http_bridge.conditional import (
    EntityTag,
    ETagList,
    MalformedHeader,
    Outcome,
    ReadOutcome,
    WriteConditions,
    evaluate_preconditions,
    evaluate_read,
    format_http_date,
    headers_from_pairs,
    parse_etag_list,
    parse_http_date,
    strong_match,
    weak_match,
    write_conditions,
)
from casledger.service.api.casledger.v1 import ledger_pb2

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
LM = datetime(2025, 5, 1, 8, 30, 15, 250_000, tzinfo=UTC)  # last modified, with microseconds
LM_S = "Thu, 01 May 2025 08:30:15 GMT"  # LM to the second
BEFORE = "Thu, 01 May 2025 08:30:14 GMT"
AFTER = "Thu, 01 May 2025 08:30:16 GMT"
CUR = '"7-3fa9"'
OK, NM, PF = Outcome.OK, Outcome.NOT_MODIFIED, Outcome.PRECONDITION_FAILED
Pairs = list[tuple[str, str]]


def T(opaque: str, weak: bool = False) -> EntityTag:
    return EntityTag(opaque, weak)


# --- entity-tag lists --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['"a"'], ETagList(tags=(T("a"),))),
        (['W/"a"'], ETagList(tags=(T("a", True),))),
        (['""'], ETagList(tags=(T(""),))),
        (['"a", W/"b"'], ETagList(tags=(T("a"), T("b", True)))),
        ([', "a" ,, "b"'], ETagList(tags=(T("a"), T("b")))),
        (['\t"a"\t,\t'], ETagList(tags=(T("a"),))),
        (['"a,b"'], ETagList(tags=(T("a,b"),))),  # a comma is an etagc
        (['"caf\xe9"'], ETagList(tags=(T("caf\xe9"),))),  # obs-text
        (['"a"', 'W/"b", "c"'], ETagList(tags=(T("a"), T("b", True), T("c")))),
        (["*"], ETagList(wildcard=True)),
        ([" * "], ETagList(wildcard=True)),
        (["*", ""], ETagList(wildcard=True)),
        ([""], ETagList()),
        ([" , ,"], ETagList()),
        ([], ETagList()),
    ],
)
def test_parse_etag_list(lines: list[str], expected: ETagList) -> None:
    assert parse_etag_list(lines) == expected


@pytest.mark.parametrize(
    "lines",
    [
        ["a"],  # missing quotes
        ['"a'],  # unterminated
        ['a"'],
        ['"a" b'],  # stray characters
        ['"a"b'],
        ['"a";'],
        ['"a b"'],  # SP is not an etagc
        ['"a\x7f"'],  # nor DEL
        ['"\u0100"'],  # nor anything past obs-text
        ['w/"a"'],  # W/ is case-sensitive
        ['W/ "a"'],
        ["W/a"],
        ['W/"a'],
        ['*, "a"'],
        ['"a", *'],
        ["*", '"a"'],  # across lines, too
        ["*, *"],
        ["**"],
        ['*"a"'],
        ["'a'"],
    ],
)
def test_parse_etag_list_malformed(lines: list[str]) -> None:
    with pytest.raises(MalformedHeader) as info:
        parse_etag_list(lines, header="If-None-Match")
    assert info.value.header == "If-None-Match"
    assert info.value.value in [*lines, ", ".join(lines)]
    assert info.value.message


def test_entity_tag_str() -> None:
    assert str(T("x")) == '"x"'
    assert str(T("x", weak=True)) == 'W/"x"'


@pytest.mark.parametrize(
    # RFC 9110 §8.8.3.2's own table.
    ("a", "b", "strong", "weak"),
    [
        (T("1", True), T("1", True), False, True),
        (T("1", True), T("2", True), False, False),
        (T("1", True), T("1"), False, True),
        (T("1"), T("1"), True, True),
    ],
)
def test_comparison(a: EntityTag, b: EntityTag, strong: bool, weak: bool) -> None:
    assert strong_match(a, b) is strong
    assert strong_match(b, a) is strong
    assert weak_match(a, b) is weak
    assert weak_match(b, a) is weak


# --- HTTP-dates ------------------------------------------------------------------------------

SUN = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",  # RFC 850
        "Sun Nov  6 08:49:37 1994",  # asctime
        "Sun Nov 06 08:49:37 1994",
        " Sun, 06 Nov 1994 08:49:37 GMT\t",
    ],
)
def test_parse_http_date_formats(value: str) -> None:
    parsed = parse_http_date(value, now=NOW)
    assert parsed == SUN
    assert parsed is not None
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    ("value", "expected_year"),
    [
        ("Wednesday, 01-Jan-75 00:00:00 GMT", 2075),  # not yet 50 years ahead of NOW
        ("Tuesday, 01-Jun-75 12:00:00 GMT", 2075),  # exactly 50 years ahead
        ("Monday, 01-Jul-75 00:00:00 GMT", 1975),  # more than 50 years ahead: the past
        ("Friday, 01-Jan-99 00:00:00 GMT", 1999),
        ("Saturday, 01-Jan-00 00:00:00 GMT", 2000),
        ("Monday, 01-Jan-24 00:00:00 GMT", 2024),
        ("Monday, 01-Jan-25 00:00:00 GMT", 2025),
        ("Monday, 31-Dec-25 00:00:00 GMT", 2025),
    ],
)
def test_rfc850_two_digit_year(value: str, expected_year: int) -> None:
    parsed = parse_http_date(value, now=NOW)
    assert parsed is not None
    assert parsed.year == expected_year


def test_rfc850_rollover_skips_an_impossible_future_date() -> None:
    # 2100 is no leap year; the only reading of 29-Feb-00 near 2090 is 2000.
    parsed = parse_http_date(
        "Tuesday, 29-Feb-00 00:00:00 GMT", now=datetime(2090, 1, 1, tzinfo=UTC)
    )
    assert parsed == datetime(2000, 2, 29, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "yesterday",
        "Sun, 06 Nov 1994 08:49:37 gmt",  # case-sensitive
        "sun, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06 nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Nov 1994 08:49:37 +0000",
        "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 94 08:49:37 GMT",
        "Sun,  06 Nov 1994 08:49:37 GMT",
        "Sun, 31 Feb 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 08:60:00 GMT",
        "Sun, 06 Nov 0000 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 GMT\n",
        "Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT",  # a list
        "Sun, \u0660\u0666 Nov 1994 08:49:37 GMT",  # Arabic-Indic digits
        "Sun, 06-Nov-94 08:49:37 GMT",  # RFC 850 wants the long day name
        "Sunday, 06-Nov-1994 08:49:37 GMT",
        "Sun Nov 6 08:49:37 1994",
        "Sun Nov  6 08:49:37 1994 GMT",
        "1994-11-06T08:49:37Z",
    ],
)
def test_parse_http_date_invalid(value: str) -> None:
    assert parse_http_date(value, now=NOW) is None


def test_leap_second_reads_as_the_second_before() -> None:
    parsed = parse_http_date("Sat, 31 Dec 2016 23:59:60 GMT")
    assert parsed == datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)


def test_format_http_date() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert format_http_date(SUN.replace(microsecond=999_999)) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert format_http_date(datetime(1994, 11, 6, 10, 49, 37, tzinfo=plus2)) == (
        "Sun, 06 Nov 1994 08:49:37 GMT"
    )
    assert format_http_date(datetime(5, 1, 2, tzinfo=UTC)) == "Sun, 02 Jan 0005 00:00:00 GMT"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_http_date(datetime(1994, 11, 6))


# --- §13.2.2 evaluation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "exists", "expected"),
    [
        # (1) If-Match: strong comparison, lists, "*".
        ("PUT", [("If-Match", CUR)], True, OK),
        ("PUT", [("If-Match", '"old"')], True, PF),
        ("PUT", [("If-Match", '"old", ' + CUR)], True, OK),
        ("PUT", [("If-Match", '"old"'), ("if-match", CUR)], True, OK),  # several lines
        ("PUT", [("If-Match", "W/" + CUR)], True, PF),  # weak never matches strongly
        ("GET", [("If-Match", "W/" + CUR)], True, PF),
        ("PUT", [("If-Match", "*")], True, OK),
        ("PUT", [("If-Match", "*")], False, PF),
        ("DELETE", [("If-Match", "*")], False, PF),
        ("PUT", [("If-Match", CUR)], False, PF),
        ("GET", [("If-Match", '"old"')], True, PF),
        ("GET", [("If-Match", CUR)], True, OK),
        ("PUT", [("If-Match", "")], True, OK),  # only empty elements: no condition
        # (2) If-Unmodified-Since, only without If-Match; one-second granularity.
        ("PUT", [("If-Unmodified-Since", LM_S)], True, OK),
        ("PUT", [("If-Unmodified-Since", AFTER)], True, OK),
        ("PUT", [("If-Unmodified-Since", BEFORE)], True, PF),
        ("GET", [("If-Unmodified-Since", BEFORE)], True, PF),
        ("PUT", [("If-Unmodified-Since", "not a date")], True, OK),
        ("PUT", [("If-Unmodified-Since", BEFORE), ("If-Unmodified-Since", BEFORE)], True, OK),
        ("PUT", [("If-Unmodified-Since", BEFORE)], False, OK),  # no modification date
        ("PUT", [("If-Match", CUR), ("If-Unmodified-Since", BEFORE)], True, OK),
        ("PUT", [("If-Match", '"old"'), ("If-Unmodified-Since", AFTER)], True, PF),
        # (3) If-None-Match: weak comparison; 304 for GET/HEAD, 412 otherwise.
        ("GET", [("If-None-Match", CUR)], True, NM),
        ("HEAD", [("If-None-Match", CUR)], True, NM),
        ("GET", [("If-None-Match", "W/" + CUR)], True, NM),
        ("GET", [("If-None-Match", '"old", ' + CUR)], True, NM),
        ("GET", [("If-None-Match", '"old"')], True, OK),
        ("GET", [("If-None-Match", "*")], True, NM),
        ("PUT", [("If-None-Match", "*")], True, PF),
        ("PUT", [("If-None-Match", "*")], False, OK),
        ("PUT", [("If-None-Match", "W/" + CUR)], True, PF),
        ("DELETE", [("If-None-Match", '"old"')], True, OK),
        ("PUT", [("If-Match", CUR), ("If-None-Match", "W/" + CUR)], True, PF),
        ("PUT", [("If-Match", "*"), ("If-None-Match", "*")], True, PF),
        ("PUT", [("If-Match", "*"), ("If-None-Match", "*")], False, PF),
        ("GET", [("If-Unmodified-Since", BEFORE), ("If-None-Match", CUR)], True, PF),
        # (4) If-Modified-Since: GET/HEAD only, without If-None-Match, not in the future.
        ("GET", [("If-Modified-Since", LM_S)], True, NM),  # LM has microseconds
        ("HEAD", [("If-Modified-Since", AFTER)], True, NM),
        ("GET", [("If-Modified-Since", BEFORE)], True, OK),
        ("GET", [("If-Modified-Since", "Sun, 01 Jun 2025 12:00:00 GMT")], True, NM),  # = now
        ("GET", [("If-Modified-Since", "Sun, 01 Jun 2025 12:00:01 GMT")], True, OK),  # future
        ("GET", [("If-Modified-Since", "garbage")], True, OK),
        ("GET", [("If-Modified-Since", AFTER), ("If-Modified-Since", AFTER)], True, OK),
        ("GET", [("If-Modified-Since", AFTER), ("If-None-Match", '"old"')], True, OK),
        ("PUT", [("If-Modified-Since", AFTER)], True, OK),
        ("DELETE", [("If-Modified-Since", AFTER)], True, OK),
        # §13.2.1: a GET of an absent resource is a 404 whatever it carries.
        ("GET", [("If-Match", "*")], False, OK),
        ("GET", [("If-None-Match", "*")], False, OK),
        ("GET", [], True, OK),
        ("PUT", [], True, OK),
    ],
)
def test_evaluate_preconditions(
    method: str, headers: Pairs, exists: bool, expected: Outcome
) -> None:
    got = evaluate_preconditions(
        method, headers, current_etag=CUR, last_modified=LM, exists=exists, now=NOW
    )
    assert got is expected


def test_evaluate_read_and_header_lookup() -> None:
    headers = headers_from_pairs([("IF-NONE-MATCH", CUR)])
    assert headers.getlist("if-none-match") == [CUR]
    got = evaluate_read(headers, current_etag=CUR, last_modified=LM, exists=True, now=NOW)
    assert got is ReadOutcome.NOT_MODIFIED
    assert evaluate_read([], current_etag=None, last_modified=None, exists=True, now=NOW) is OK


def test_evaluate_malformed_raises_even_when_not_evaluated() -> None:
    with pytest.raises(MalformedHeader):
        evaluate_read([("If-Match", "nope")], current_etag=CUR, last_modified=LM, exists=False)


def test_evaluate_rejects_a_malformed_current_etag_as_a_bug() -> None:
    with pytest.raises(ValueError, match="not an entity-tag"):
        evaluate_read([("If-Match", CUR)], current_etag="7", last_modified=LM, exists=True)


# --- write conditions --------------------------------------------------------------------------

P = ledger_pb2.Precondition
IUS_PRE = P(unmodified_since=Timestamp(seconds=int(LM.replace(microsecond=0).timestamp())))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], WriteConditions()),
        ([("If-Match", "*")], WriteConditions(P(exists=True), if_match_any=True)),
        ([("If-Match", CUR)], WriteConditions(P(etag=CUR), etag_candidates=(CUR,))),
        (
            [("If-Match", '"a", W/"b", "a"'), ("If-Match", '"c"')],
            WriteConditions(P(etag='"a"'), etag_candidates=('"a"', '"c"')),
        ),
        ([("If-Match", 'W/"a", W/"b"')], WriteConditions(always_fails=True)),
        (
            [("If-Match", "*"), ("If-None-Match", "*")],
            WriteConditions(create_only=True, always_fails=True),
        ),
        (
            [("If-Match", '"a"'), ("If-None-Match", "*")],
            WriteConditions(create_only=True, always_fails=True),
        ),
        (
            [("If-Match", '"a", "b"'), ("If-None-Match", 'W/"a"')],
            WriteConditions(
                P(etag='"b"'), etag_candidates=('"b"',), none_match_tags=(T("a", True),)
            ),
        ),
        (
            [("If-Match", '"a"'), ("If-None-Match", '"a"')],
            WriteConditions(always_fails=True, none_match_tags=(T("a"),)),
        ),
        (
            [("If-Match", "*"), ("If-None-Match", '"x"')],
            WriteConditions(P(exists=True), if_match_any=True, none_match_tags=(T("x"),)),
        ),
        ([("If-Unmodified-Since", LM_S)], WriteConditions(IUS_PRE)),
        ([("If-Unmodified-Since", "Thursday, 01-May-25 08:30:15 GMT")], WriteConditions(IUS_PRE)),
        ([("If-Unmodified-Since", "Thu May  1 08:30:15 2025")], WriteConditions(IUS_PRE)),
        ([("If-Unmodified-Since", "soon")], WriteConditions()),
        (
            [("If-Match", CUR), ("If-Unmodified-Since", LM_S)],
            WriteConditions(P(etag=CUR), etag_candidates=(CUR,)),
        ),
        ([("If-Modified-Since", LM_S)], WriteConditions()),  # never a write condition
        ([("If-None-Match", "*")], WriteConditions(create_only=True)),
        (
            [("If-None-Match", "*"), ("If-Unmodified-Since", LM_S)],
            WriteConditions(create_only=True),
        ),
        (
            [("If-None-Match", CUR)],
            WriteConditions(none_match_tags=(T("7-3fa9"),), sent_etag_on_if_none_match=True),
        ),
        (
            [("If-None-Match", CUR), ("If-Unmodified-Since", LM_S)],
            WriteConditions(IUS_PRE, none_match_tags=(T("7-3fa9"),)),
        ),
        ([("If-Match", ""), ("If-None-Match", " , ")], WriteConditions()),
    ],
)
def test_write_conditions(headers: Pairs, expected: WriteConditions) -> None:
    assert write_conditions(headers, now=NOW) == expected


@pytest.mark.parametrize(
    ("header", "value"),
    [("If-Match", '"a'), ("If-Match", 'w/"a"'), ("If-None-Match", '*, "a"'), ("If-Match", "abc")],
)
def test_write_conditions_malformed(header: str, value: str) -> None:
    with pytest.raises(MalformedHeader) as info:
        write_conditions([(header, value), ("If-Unmodified-Since", LM_S)])
    assert (info.value.header, info.value.value) == (header, value)


def test_needs_current_etag_and_bind() -> None:
    several = write_conditions([("If-Match", '"a", "b"')])
    assert several.needs_current_etag
    assert several.bind('"b"') == P(etag='"b"')
    assert several.bind(None) == P(etag='"a"')  # absent: the service fails it (or 404s a DELETE)
    star = write_conditions([("If-Match", "*"), ("If-None-Match", '"x"')])
    assert star.needs_current_etag
    assert star.bind(CUR) == P(etag=CUR)
    ius = write_conditions([("If-Unmodified-Since", LM_S), ("If-None-Match", '"x"')])
    assert ius.needs_current_etag
    assert ius.bind(CUR) == IUS_PRE
    for plain in ([("If-Match", CUR)], [("If-Match", "*")], [("If-Unmodified-Since", LM_S)]):
        assert not write_conditions(plain).needs_current_etag
    only_inm = write_conditions([("If-None-Match", CUR)])
    assert not only_inm.needs_current_etag
    assert only_inm.bind(CUR) is None  # never turns If-None-Match alone into a precondition


# --- properties ---------------------------------------------------------------------------------

ETAGC = st.sampled_from([chr(c) for c in (0x21, *range(0x23, 0x7F), *range(0x80, 0x100))])
TAGS = st.builds(EntityTag, st.text(ETAGC, max_size=12), st.booleans())
OWS = st.text(" \t", max_size=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(TAGS, max_size=5), min_size=1, max_size=3), st.data())
def test_rendered_etag_lists_parse_back(lines: list[list[EntityTag]], data: st.DataObject) -> None:
    rendered = []
    for tags in lines:
        parts = [data.draw(OWS) + str(t) + data.draw(OWS) for t in tags]
        parts = [p for part in parts for p in [part, *data.draw(st.lists(OWS, max_size=2))]]
        rendered.append(",".join(data.draw(st.lists(OWS, max_size=2)) + parts))
    assert parse_etag_list(rendered).tags == tuple(t for tags in lines for t in tags)


JUNK = st.text(st.sampled_from([*list('W/w"*, \t\x7f\x80ÿabc'), "Ā", "\n"]), max_size=20)


@settings(max_examples=200, deadline=None)
@given(st.lists(JUNK | st.text(max_size=20), max_size=3))
def test_parse_etag_list_total(lines: list[str]) -> None:
    try:
        result = parse_etag_list(lines)
    except MalformedHeader:
        return  # the one exception allowed
    assert isinstance(result, ETagList)


SECONDS = st.datetimes(
    min_value=datetime(1, 1, 1),
    max_value=datetime(9999, 12, 31, 23, 59, 59),
    timezones=st.just(UTC),
).map(lambda dt: dt.replace(microsecond=0))
# Rendered by hand, not strftime: %a and %b follow the locale.
LONG_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc850(dt: datetime) -> str:
    date = f"{dt.day:02d}-{MONTHS[dt.month - 1]}-{dt.year % 100:02d}"
    return f"{LONG_DAYS[dt.weekday()]}, {date} {dt:%H:%M:%S} GMT"


def asctime(dt: datetime) -> str:
    day, month = LONG_DAYS[dt.weekday()][:3], MONTHS[dt.month - 1]
    return f"{day} {month} {dt.day:2d} {dt:%H:%M:%S} {dt.year:04d}"


@settings(max_examples=200, deadline=None)
@given(SECONDS)
def test_imf_and_asctime_parse_back(dt: datetime) -> None:
    assert parse_http_date(format_http_date(dt)) == dt
    assert parse_http_date(asctime(dt)) == dt


@settings(max_examples=200, deadline=None)
@given(
    st.datetimes(datetime(1901, 1, 1), datetime(2199, 1, 1), timezones=st.just(UTC)).map(
        lambda dt: dt.replace(microsecond=0)
    ),
    st.integers(-49 * 366, 49 * 366),
)
def test_rfc850_parses_back_within_fifty_years(now: datetime, offset_days: int) -> None:
    dt = now + timedelta(days=offset_days, seconds=offset_days % 86_400)
    assert parse_http_date(rfc850(dt), now=now) == dt


DATE_JUNK = st.text(
    st.sampled_from(list(string.digits + " ,:-GMTSunNovMonday\t\n\u0660")), max_size=40
)


@settings(max_examples=200, deadline=None)
@given(DATE_JUNK | st.text(max_size=40) | SECONDS.map(format_http_date).map(lambda s: s[:-1] + "x"))
def test_parse_http_date_total(value: str) -> None:
    result = parse_http_date(value, now=NOW)
    assert result is None or result.tzinfo is UTC


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(['"a"', '"b"', 'W/"a"', 'W/"b"', "*"]), max_size=3),
    st.lists(st.sampled_from(['"a"', '"b"', 'W/"a"', "*"]), max_size=2),
    st.sampled_from([None, BEFORE, LM_S]),
    st.sampled_from(['"a"', '"b"', '"c"']),
)
def test_bridge_recipe_agrees_with_the_rfc(
    if_match: list[str], if_none_match: list[str], ius: str | None, current: str
) -> None:
    """Following WriteConditions' documented steps against a CAS service gives §13.2.2's
    answer for an existing resource, except where the ledger demands a precondition (428)."""
    headers = [("If-Match", v) for v in if_match] + [("If-None-Match", v) for v in if_none_match]
    headers += [("If-Unmodified-Since", ius)] if ius else []
    try:
        expected = evaluate_preconditions(
            "PUT", headers, current_etag=current, last_modified=LM, exists=True, now=NOW
        )
    except MalformedHeader:
        return
    wc = write_conditions(headers, now=NOW)

    def service(pre: ledger_pb2.Precondition) -> Outcome:  # the CAS, for an existing resource
        if pre.HasField("etag"):
            return OK if pre.etag == current else PF
        if pre.HasField("unmodified_since"):
            return (
                OK if LM.replace(microsecond=0).timestamp() <= pre.unmodified_since.seconds else PF
            )
        return OK if pre.exists else PF

    pre: ledger_pb2.Precondition | None
    if wc.always_fails or wc.create_only:
        got = PF  # CreateResource answers ALREADY_EXISTS -> 412
    else:
        pre = wc.precondition
        if wc.needs_current_etag:
            checked = evaluate_preconditions(
                "PUT", headers, current_etag=current, last_modified=LM, exists=True, now=NOW
            )
            pre = wc.bind(current) if checked is OK else None
            if pre is None:
                assert expected is PF
                return
        if pre is None:  # 428: the ledger's policy, stricter than the RFC
            assert not if_match
            assert ius is None
            assert wc.sent_etag_on_if_none_match == bool(wc.none_match_tags)
            return
        got = service(pre)
    assert got is expected
