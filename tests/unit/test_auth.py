"""Access control rules, pure: tokens and their hashes, the tokens file, scopes, whole-segment
prefixes, the per-method rules, and who may serve without tokens."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from pathlib import Path

import pytest

from casledger.service import auth, errors
from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.auth import Grant, Scope

TOKEN = "cl_test-token-for-alice"
ENTRY = f"""
[[tokens]]
principal = "alice"
scopes = ["read", "write"]
prefixes = ["documents", "projects/p1"]
hash = "{auth.hash_token(TOKEN)}"
created = "2025-01-01T00:00:00Z"
"""


def grant(*scopes: Scope, prefixes: tuple[str, ...] = ()) -> Grant:
    return Grant("alice", frozenset(scopes), prefixes)


# --- tokens and hashes -----------------------------------------------------------------------


def test_new_tokens_are_random_header_safe_and_256_bits() -> None:
    tokens = {auth.new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert re.fullmatch(r"cl_[A-Za-z0-9_-]{43}", token), token


def test_the_hash_is_sha256_hex_of_the_token() -> None:
    assert auth.hash_token(TOKEN) == "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()
    assert auth.hash_token(TOKEN) != auth.hash_token(TOKEN + "x")


def test_lookup_finds_the_grant_of_a_known_token_only() -> None:
    table = auth.parse_tokens(ENTRY)
    found = table.lookup(TOKEN)
    assert found == Grant("alice", frozenset({Scope.READ, Scope.WRITE}),
                          ("documents", "projects/p1"))
    assert table.lookup(TOKEN + "x") is None
    assert table.lookup(TOKEN[:-1]) is None
    assert table.lookup("") is None
    assert table.lookup(auth.hash_token(TOKEN)) is None  # the stored hash is not a token
    assert table.lookup("x" * 10_000) is None


def test_lookup_compares_whole_digests() -> None:
    digest = hashlib.sha256(TOKEN.encode()).digest()
    alice = grant(Scope.READ)
    for position in (0, 15, 31):  # one byte off, anywhere, is another token
        near = bytearray(digest)
        near[position] ^= 1
        assert auth.TokenTable(((bytes(near), alice),)).lookup(TOKEN) is None
    assert auth.TokenTable(((digest[:16], alice),)).lookup(TOKEN) is None
    assert auth.TokenTable(((digest, alice),)).lookup(TOKEN) is alice


def test_lookup_compares_with_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: every stored hash is compared, with hmac.compare_digest, even after a
    match (here the first entry matches)."""
    text = ENTRY + "".join(
        f'\n[[tokens]]\nprincipal = "p{i}"\nscopes = ["read"]\n'
        f'hash = "{auth.hash_token(f"t{i}")}"\n' for i in range(4))
    table = auth.parse_tokens(text)
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert table.lookup(TOKEN) is not None
    assert len(calls) == 5
    calls.clear()
    assert table.lookup("unknown") is None
    assert len(calls) == 5


# --- the tokens file -------------------------------------------------------------------------


def test_an_empty_file_holds_no_tokens() -> None:
    assert len(auth.parse_tokens("")) == 0
    assert len(auth.parse_tokens("# nothing yet\n")) == 0


def test_prefixes_are_optional_and_admin_may_stand_alone() -> None:
    table = auth.parse_tokens(f'[[tokens]]\nprincipal = "root"\nscopes = ["admin"]\n'
                              f'hash = "{auth.hash_token("r")}"\n')
    assert table.lookup("r") == Grant("root", frozenset({Scope.ADMIN}), ())


@pytest.mark.parametrize(("text", "message"), [
    ("tokens = [", "not valid TOML"),
    ('[[token]]\nprincipal = "a"', "unknown key(s) token"),
    ('tokens = "x"', "array of tables"),
    ('tokens = ["x"]', "token 1: must be a table"),
    (ENTRY.replace('principal = "alice"', 'principal = 7'), "principal must be a string"),
    (ENTRY.replace('principal = "alice"', 'principal = "al ice"'), "principal 'al ice'"),
    (ENTRY.replace('principal = "alice"', 'principal = "anonymous"'), "reserved"),
    (ENTRY.replace('["read", "write"]', '["read", "delete"]'), "unknown scope 'delete'"),
    (ENTRY.replace('["read", "write"]', "[]"), "at least one scope"),
    (ENTRY.replace('["read", "write"]', '"read"'), "scopes must be a list"),
    (ENTRY.replace('["documents", "projects/p1"]', '["documents/"]'), "prefix 'documents/'"),
    (ENTRY.replace('["documents", "projects/p1"]', '[""]'), "must not be empty"),
    (ENTRY.replace('["documents", "projects/p1"]', '"documents"'), "prefixes must be a list"),
    (ENTRY.replace(auth.hash_token(TOKEN), TOKEN), "hash must be 'sha256:'"),
    (ENTRY.replace(auth.hash_token(TOKEN), auth.hash_token(TOKEN).upper()), "hash must be"),
    (ENTRY.replace("created", "prefix"), "unknown key(s) prefix"),
    (ENTRY + ENTRY.replace('"alice"', '"bob"'), "tokens 1 and 2 have the same hash"),
])
def test_a_bad_file_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(auth.TokenFileError) as refused:
        auth.parse_tokens(text, "tokens.toml")
    assert message in str(refused.value)
    assert str(refused.value).startswith("tokens.toml")


def test_a_world_writable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(ENTRY)
    path.chmod(0o646)
    with pytest.raises(auth.TokenFileError, match="writable by anybody"):
        auth.read_tokens(path)
    path.chmod(0o644)
    assert len(auth.read_tokens(path)[0]) == 1


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(auth.TokenFileError, match="cannot read the tokens file"):
        auth.TokenFile(tmp_path / "absent.toml")


# --- create_token ----------------------------------------------------------------------------


def test_create_token_makes_a_0600_file_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    first = auth.create_token(path, principal="alice", scopes=["read", "write"],
                              prefixes=["documents"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = auth.create_token(path, principal="bob", scopes=["admin"])
    assert first != second
    text = path.read_text()
    assert first not in text
    assert second not in text  # only hashes are stored
    assert auth.hash_token(first) in text
    table, _ = auth.read_tokens(path)
    assert table.lookup(first) == Grant("alice", frozenset({Scope.READ, Scope.WRITE}),
                                        ("documents",))
    assert table.lookup(second) == Grant("bob", frozenset({Scope.ADMIN}))


def test_create_token_keeps_an_existing_files_mode_and_content(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(ENTRY.rstrip("\n"))  # no newline at the end
    path.chmod(0o640)
    token = auth.create_token(path, principal="bob", scopes=["read"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    table, _ = auth.read_tokens(path)
    assert table.lookup(TOKEN) is not None
    assert table.lookup(token) is not None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"principal": "bad name", "scopes": ["read"]}, "principal"),
    ({"principal": "a", "scopes": []}, "at least one scope"),
    ({"principal": "a", "scopes": ["root"]}, "unknown scope"),
    ({"principal": "a", "scopes": ["read"], "prefixes": ["a//b"]}, "prefix 'a//b'"),
])
def test_create_token_refuses_bad_grants_and_writes_nothing(
        tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    path = tmp_path / "tokens.toml"
    with pytest.raises(ValueError, match=message):
        auth.create_token(path, **kwargs)  # type: ignore[arg-type]
    assert not path.exists()


def test_create_token_never_appends_to_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text("tokens = [")
    with pytest.raises(auth.TokenFileError, match="not valid TOML"):
        auth.create_token(path, principal="a", scopes=["read"])
    assert path.read_text() == "tokens = ["


# --- TokenFile: authenticate, and reading the file again -------------------------------------


def bearer(token: str) -> list[tuple[str, str | bytes]]:
    return [("user-agent", "test"), ("authorization", f"Bearer {token}")]


def test_authenticate_reads_the_bearer_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(ENTRY)
    tokens = auth.TokenFile(path)
    assert tokens.authenticate(bearer(TOKEN)).principal == "alice"
    assert tokens.authenticate([("Authorization", f"bearer   {TOKEN} ")]).principal == "alice"


@pytest.mark.parametrize(("metadata", "message"), [
    (None, "requires a bearer token"),
    ([], "requires a bearer token"),
    ([("x-authorization", f"Bearer {TOKEN}")], "requires a bearer token"),
    ([("authorization", f"Basic {TOKEN}")], "not a bearer token"),
    ([("authorization", "Bearer")], "not a bearer token"),
    ([("authorization", "Bearer  ")], "not a bearer token"),
    ([("authorization", TOKEN)], "not a bearer token"),
    ([("authorization", b"Bearer x")], "not a bearer token"),
    ([("authorization", f"Bearer {TOKEN}")] * 2, "one authorization"),
    ([("authorization", f"Bearer {TOKEN}x")], "not valid"),
])
def test_authenticate_refuses(tmp_path: Path, metadata: list[tuple[str, str | bytes]] | None,
                              message: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(ENTRY)
    with pytest.raises(errors.Unauthenticated, match=message):
        auth.TokenFile(path).authenticate(metadata)


def test_the_file_is_read_again_when_it_changes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(ENTRY)
    now = [0.0]
    tokens = auth.TokenFile(path, recheck_s=1.0, clock=lambda: now[0])
    bob = auth.create_token(path, principal="bob", scopes=["read"])
    # Not before recheck_s has passed...
    with pytest.raises(errors.Unauthenticated):
        tokens.authenticate(bearer(bob))
    now[0] = 1.0
    assert tokens.authenticate(bearer(bob)).principal == "bob"
    # A revoked token (its entry removed) stops working.
    path.write_text(path.read_text().replace(ENTRY.strip(), ""))
    now[0] = 2.0
    with pytest.raises(errors.Unauthenticated):
        tokens.authenticate(bearer(TOKEN))
    assert tokens.authenticate(bearer(bob)).principal == "bob"
    # A broken version is logged once; the tokens before it stay in force.
    path.write_text("tokens = [")
    now[0] = 3.0
    with caplog.at_level(logging.ERROR, "casledger.auth"):
        assert tokens.authenticate(bearer(bob)).principal == "bob"
        now[0] = 4.0
        assert tokens.authenticate(bearer(bob)).principal == "bob"
    assert [r.message.count("stay in force") for r in caplog.records] == [1]
    os.remove(path)
    now[0] = 5.0
    assert tokens.authenticate(bearer(bob)).principal == "bob"


def test_an_empty_tokens_file_is_a_warning(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text("")
    with caplog.at_level(logging.WARNING, "casledger.auth"):
        tokens = auth.TokenFile(path)
    assert "every call will be refused" in caplog.text
    with pytest.raises(errors.Unauthenticated):
        tokens.authenticate(bearer(TOKEN))


# --- scopes and prefixes ---------------------------------------------------------------------


def test_admin_implies_read_and_write() -> None:
    admin = grant(Scope.ADMIN)
    assert all(admin.allows(scope) for scope in Scope)
    reader = grant(Scope.READ)
    assert reader.allows(Scope.READ)
    assert not reader.allows(Scope.WRITE)
    assert not reader.allows(Scope.ADMIN)
    writer = grant(Scope.WRITE)  # write alone does not imply read
    assert not writer.allows(Scope.READ)


@pytest.mark.parametrize(("path", "covered"), [
    ("documents", True),
    ("documents/1", True),
    ("documents/1/notes/n", True),
    ("documentsX/1", False),
    ("document", False),
    ("projects/p1", True),
    ("projects/p1/notes/n1", True),
    ("projects/p10/notes/n1", False),
    ("projects", False),  # the collection holds other projects too
    ("", False),  # the whole ledger
])
def test_prefixes_match_whole_segments(path: str, covered: bool) -> None:
    limited = grant(Scope.READ, prefixes=("documents", "projects/p1"))
    assert limited.covers(path) is covered
    assert grant(Scope.READ).covers(path)  # no prefixes: everything, the whole ledger too


# --- the per-method rules --------------------------------------------------------------------


def test_every_ledger_method_has_a_rule() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Ledger"].methods}
    assert set(auth.METHOD_ACCESS) | auth.PER_OPERATION == methods
    assert not set(auth.METHOD_ACCESS) & auth.PER_OPERATION


READS = [("GetResource", pb.GetResourceRequest(name="documents/1")),
         ("ListResources", pb.ListResourcesRequest(parent="documents")),
         ("ListVersions", pb.ListVersionsRequest(name="documents/1")),
         ("Watch", pb.WatchRequest(prefix="documents"))]
WRITES = [("CreateResource", pb.CreateResourceRequest(parent="documents", resource_id="1")),
          ("CreateResource", pb.CreateResourceRequest(parent="documents")),
          ("UpdateResource", pb.UpdateResourceRequest(name="documents/1")),
          ("DeleteResource", pb.DeleteResourceRequest(name="documents/1"))]


@pytest.mark.parametrize(("method", "request_"), READS + WRITES)
def test_scopes_per_method(method: str, request_: object) -> None:
    needed = Scope.READ if (method, request_) in READS else Scope.WRITE
    other = Scope.WRITE if needed is Scope.READ else Scope.READ
    auth.authorize(grant(needed), method, request_)
    auth.authorize(grant(Scope.ADMIN), method, request_)
    with pytest.raises(errors.PermissionDenied) as denied:
        auth.authorize(grant(other), method, request_)
    assert denied.value.metadata() == {"principal": "alice", "scope": str(needed)}
    # A request that did not parse is checked for its scope alone.
    auth.authorize(grant(needed), method, None)
    with pytest.raises(errors.PermissionDenied):
        auth.authorize(grant(other), method, None)


@pytest.mark.parametrize(("method", "request_", "path"), [
    ("GetResource", pb.GetResourceRequest(name="secrets/1"), "secrets/1"),
    ("ListResources", pb.ListResourcesRequest(parent="secrets"), "secrets"),
    ("ListResources", pb.ListResourcesRequest(parent="projects"), "projects"),
    ("ListVersions", pb.ListVersionsRequest(name="documentsX/1"), "documentsX/1"),
    ("Watch", pb.WatchRequest(prefix="secrets"), "secrets"),
    ("Watch", pb.WatchRequest(prefix=""), ""),
    ("CreateResource", pb.CreateResourceRequest(parent="secrets", resource_id="1"), "secrets/1"),
    ("CreateResource", pb.CreateResourceRequest(parent="secrets"), "secrets"),
    ("CreateResource", pb.CreateResourceRequest(parent="projects", resource_id="p2"),
     "projects/p2"),
    ("UpdateResource", pb.UpdateResourceRequest(name="secrets/1"), "secrets/1"),
    ("DeleteResource", pb.DeleteResourceRequest(name="projects/p2"), "projects/p2"),
])
def test_prefix_limits_per_method(method: str, request_: object, path: str) -> None:
    limited = grant(Scope.ADMIN, prefixes=("documents", "projects/p1"))
    with pytest.raises(errors.PermissionDenied) as denied:
        auth.authorize(limited, method, request_)
    assert denied.value.metadata() == ({"principal": "alice", "name": path} if path
                                       else {"principal": "alice"})
    assert "limited to documents, projects/p1" in denied.value.message
    auth.authorize(grant(Scope.ADMIN), method, request_)  # unlimited: allowed


@pytest.mark.parametrize(("method", "request_"), [
    *READS, *WRITES,
    ("CreateResource", pb.CreateResourceRequest(parent="projects", resource_id="p1")),
    ("CreateResource", pb.CreateResourceRequest(parent="projects/p1/notes")),
    ("Watch", pb.WatchRequest(prefix="projects/p1/notes")),
])
def test_within_the_prefixes_is_allowed(method: str, request_: object) -> None:
    auth.authorize(grant(Scope.ADMIN, prefixes=("documents", "projects/p1")), method, request_)


def test_a_method_without_a_rule_is_nobodys() -> None:
    with pytest.raises(errors.PermissionDenied, match="no access rule"):
        auth.authorize(grant(Scope.ADMIN), "DropLedger", None)


# --- who may serve without tokens ------------------------------------------------------------


@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1:50051", True),
    ("127.5.6.7:1", True),
    ("localhost:8080", True),
    ("LOCALHOST:8080", True),
    ("[::1]:50051", True),
    ("0.0.0.0:50051", False),
    ("[::]:50051", False),
    ("10.0.0.1:50051", False),
    ("192.168.1.2:80", False),
    ("example.com:443", False),
    ("myhost:1", False),
])
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert auth.is_loopback(listen) is loopback


def test_exposure_needs_tokens_or_insecure() -> None:
    public = [("--grpc-listen", "127.0.0.1:1"), ("--http-listen", "0.0.0.0:8080")]
    problem = auth.exposure_problem(listens=public, tokens=False, insecure=False)
    assert problem is not None
    assert "--http-listen 0.0.0.0:8080" in problem
    assert "--grpc-listen" not in problem
    assert "--insecure" in problem
    assert "--auth-tokens-file" in problem
    assert auth.exposure_problem(listens=public, tokens=True, insecure=False) is None
    assert auth.exposure_problem(listens=public, tokens=False, insecure=True) is None
    assert auth.exposure_problem(listens=public[:1], tokens=False, insecure=False) is None


def test_settings_refuse_an_open_ledger_off_loopback() -> None:
    from casledger.service.config import Settings, SettingsError

    with pytest.raises(SettingsError, match=re.escape("--grpc-listen 0.0.0.0:50051")):
        Settings(grpc_listen="0.0.0.0:50051", no_http=True)
    with pytest.raises(SettingsError, match=re.escape("--http-listen 0.0.0.0:8080")):
        Settings(http_listen="0.0.0.0:8080")
    Settings(http_listen="0.0.0.0:8080", no_http=True)  # no bridge, nothing exposed
    Settings(grpc_listen="0.0.0.0:50051", insecure=True)
    Settings(grpc_listen="0.0.0.0:50051", http_listen="[::]:8080", auth_tokens_file="t.toml")
    with pytest.raises(SettingsError, match="--tls-cert and --tls-key go together"):
        Settings(tls_cert="cert.pem")


# --- token list and revoke -------------------------------------------------------------------


def test_list_shows_each_entry_by_the_start_of_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(ENTRY)
    bob = auth.create_token(path, principal="bob", scopes=["admin"])

    alice_info, bob_info = auth.list_tokens(path)

    assert alice_info.digest == auth.hash_token(TOKEN).removeprefix("sha256:")
    assert alice_info.id == alice_info.digest[:12]
    assert alice_info.grant == Grant("alice", frozenset({Scope.READ, Scope.WRITE}),
                                     ("documents", "projects/p1"))
    assert alice_info.created == "2025-01-01T00:00:00Z"
    assert bob_info.digest == auth.hash_token(bob).removeprefix("sha256:")
    assert bob_info.grant.principal == "bob"


def test_revoke_removes_exactly_that_entry_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    bob = auth.create_token(path, principal="bob", scopes=["read"])
    carol = auth.create_token(path, principal="carol", scopes=["write"])
    path.chmod(0o640)
    bob_id = auth.list_tokens(path)[0].id
    header = path.read_text().split("[[tokens]]")[0]

    revoked = auth.revoke_token(path, "sha256:" + bob_id.upper()[:8])

    assert revoked.grant.principal == "bob"
    table, _ = auth.read_tokens(path)
    assert table.lookup(bob) is None
    assert table.lookup(carol) is not None
    assert path.read_text().startswith(header)  # the comments stay
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.toml"]  # no temporary left


@pytest.mark.parametrize(("token_id", "message"), [
    ("abc", "at least 8 hex digits"),
    ("xyzxyzxyz", "at least 8 hex digits"),
    ("00000000", "no token"),
])
def test_revoke_refuses_an_id_it_cannot_resolve(tmp_path: Path, token_id: str,
                                                message: str) -> None:
    path = tmp_path / "tokens.toml"
    auth.create_token(path, principal="bob", scopes=["read"])
    before = path.read_text()

    with pytest.raises(ValueError, match=message):
        auth.revoke_token(path, token_id)
    assert path.read_text() == before


def test_revoke_refuses_an_ambiguous_id_and_an_entry_it_cannot_cut_out(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    twins = [f'{{principal = "p{i}", scopes = ["read"], hash = "sha256:{"ab" * 31}{i:02x}"}}'
             for i in range(2)]
    path.write_text(f"tokens = [{', '.join(twins)}]\n")
    before = path.read_text()

    with pytest.raises(ValueError, match="2 tokens"):
        auth.revoke_token(path, "ab" * 4)
    with pytest.raises(ValueError, match="remove it by hand"):
        auth.revoke_token(path, "ab" * 31 + "01")
    assert path.read_text() == before
