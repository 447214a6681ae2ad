"""What a running service holds: its settings, database, sealer and token machinery."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.auth.caller import GrantsCache
from app.auth.keys import KeySource, OwnKeySource, PrivateKey, RemoteKeySource, create_signing_key, newest_signing_key
from app.auth.tokens import TokenVerifier, TrustedIssuerKeys
from app.config import Settings
from app.database import (
    make_async_read_engine,
    make_async_write_engine,
    make_engine,
    make_session_factory,
    session_scope,
)
from app.private_files import prepare_data_dir
from app.queue import BuildQueue
from app.reads import LoopReads, Reads, ThreadReads
from app.sealing import Sealer
from app.services.accounts import KnownAccounts
from app.services.event_ids import EventIds
from app.services.source_urls import SourceUrlPolicy
from app.storage.base import AssetStore
from app.storage.factory import make_asset_store
from app.writes import LoopWrites, ThreadWrites, Writes


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    # What read-only sessions use: on PostgreSQL a pool of its own (make_engine(read_only=True)).
    read_engine: Engine
    # For what only reads (GET requests, event streams, metrics): never waits for a writer.
    read_session_factory: sessionmaker[Session]
    # How requests read: on the event loop on PostgreSQL (app.reads), with read_session_factory's sessions elsewhere.
    reads: Reads
    # How requests write: with session_factory's sessions; on PostgreSQL prebuilt statements
    # on the event loop too (app.writes: a model's registration).
    writes: Writes
    sealer: Sealer
    # The tokens event ids leave the service as (streams, webhooks, ETags): the same in every process.
    event_ids: EventIds
    verifier: TokenVerifier
    # The service's own public keys, one cache per process: the API token check above and the
    # image store's registry tokens (another audience) both read them.
    own_keys: KeySource
    asset_store: AssetStore
    build_queue: BuildQueue
    grants_cache: GrantsCache = field(default_factory=lambda: GrantsCache(0))
    known_accounts: KnownAccounts = field(default_factory=lambda: KnownAccounts(0))
    _signing_key: PrivateKey | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        engine: Engine | None = None,
        session_factory: sessionmaker[Session] | None = None,
        read_session_factory: sessionmaker[Session] | None = None,
    ) -> ServiceContext:
        """Everything the service needs, for these settings (tests hand in their own sessions)."""
        prepare_data_dir(settings)
        engine = engine or make_engine(settings)
        factory = session_factory or make_session_factory(engine)
        # Tests hand in factories whose sessions join the test's transaction.
        read_engine = engine
        if read_session_factory or session_factory:
            read_factory = read_session_factory or session_factory
            reads: Reads = ThreadReads(read_factory)
        elif engine.dialect.name == "postgresql":
            read_engine = make_engine(settings, read_only=True)
            read_factory = make_session_factory(read_engine, read_only=True)
            reads = LoopReads(make_async_read_engine(settings), threads=ThreadReads(read_factory))
        else:
            read_factory = make_session_factory(read_engine, read_only=True)
            reads = ThreadReads(read_factory)
        writes: Writes = ThreadWrites(factory, engine.dialect.name)
        if engine.dialect.name == "postgresql" and session_factory is None:
            writes = LoopWrites(make_async_write_engine(settings), threads=writes)
        own_keys = OwnKeySource(read_factory, settings.jwks_refresh_min_seconds)
        issuers = [TrustedIssuerKeys(issuer=settings.issuer, audience=settings.audience, keys=own_keys)] + [
            TrustedIssuerKeys(
                issuer=trusted.issuer,
                audience=trusted.audience or settings.audience,
                keys=RemoteKeySource(trusted.jwks_uri, settings.jwks_refresh_min_seconds),
            )
            for trusted in settings.trusted_issuers
        ]
        secret_key = settings.resolved_secret_key()
        return cls(
            settings=settings,
            engine=engine,
            session_factory=factory,
            read_engine=read_engine,
            read_session_factory=read_factory,
            reads=reads,
            writes=writes,
            sealer=Sealer(secret_key),
            event_ids=EventIds(secret_key),
            verifier=TokenVerifier(issuers, settings.clock_skew_seconds),
            own_keys=own_keys,
            asset_store=make_asset_store(settings, secret_key),
            build_queue=BuildQueue(settings.resolved_broker_url, settings.build_queue),
            grants_cache=GrantsCache(settings.auth_cache_seconds),
            known_accounts=KnownAccounts(settings.auth_cache_seconds),
        )

    def dispose(self) -> None:
        """Close every pooled database connection, but the event loop's reads' and writes'
        (``reads.close()``, ``writes.close()``, on the loop that used them: the app's lifespan does)."""
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()

    @property
    def url_policy(self) -> SourceUrlPolicy:
        return SourceUrlPolicy(store=self.asset_store, require_https=self.settings.requires_https_urls)

    def signing_key(self) -> PrivateKey:
        """The key new tokens are signed with: the newest stored one, made on first use."""
        if self._signing_key is None:
            with self._lock:
                if self._signing_key is None:
                    with session_scope(self.session_factory) as session:
                        key = newest_signing_key(session, sealer=self.sealer)
                        if key is None:
                            key = create_signing_key(session, sealer=self.sealer)
                    self._signing_key = key
        return self._signing_key
