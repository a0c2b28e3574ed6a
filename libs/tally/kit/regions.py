"""Data residency inside one process: one copy of a service per region, each on its region's
own database, and a router that sends every call to the copy of the org it names.

An org is pinned to a region when accounts creates it; accounts' credentials feed carries each
org's region to every replica. A process configured with TALLY_REGION_DATABASES
(`eu-west=postgresql://…;us-east=postgresql://…`, the first being its home region) builds the
service once per region — its own pools, migrations, outbox sealers and background loops on
that region's database — and serves them all on one port. Each call goes to the copy of the
region of the org its request names (the orgs the policy table names, tally.kit.policy), so
nothing about an EU org is read from or written to the US database. Refused, with
FAILED_PRECONDITION / WRONG_REGION naming the reason:
- an org of a region this process has no database for (the caller goes to that region),
- an org accounts has not told this replica about (its region, so its database, is unknown),
- one request (or one stream) naming orgs of two regions (one call per region).
A call that names no org (a catalog read, an id-only lookup, an outbox stream) goes to the
region the `x-tally-region` header names, else to the home region; a unary one that the home
region answers NOT_FOUND is asked of the other regions in turn, so an order id of any region
is found. A unary call whose answer is about every org (metering's GetPricingUse: does anyone
still use this model?) is asked of every region and their answers merged, by the merge the
service gives for it (`every_region`): the home region alone would answer for its orgs only.

The guard's TALLY_REGIONS check (tally.kit.auth) still applies in front of this: a deployment
per region sets both; a process serving several regions lists them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from tally.kit import policy
from tally.kit.config import KitConfig
from tally.kit.errors import STATUS_OF, Reason, TallyError
from tally.kit.log import get_logger
from tally.kit.server import ServiceApp

log = get_logger("tally.kit.regions")

ROUTE_HEADER: Final = "x-tally-region"
"""Names the region of a call whose request names no org."""


class _Capture:
    """Stands in for a grpc server while a region's app registers its servicers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """The same handlers arrive through add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]
                                       ) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler


@dataclass
class RegionRouter:
    """Sends each call to the app of its org's region."""

    apps: Mapping[str, ServiceApp]
    """region -> the service built on that region's database; the first is the home."""
    regions_of: Callable[[], Mapping[str, str]]
    """org_id -> region, as accounts last said (read on every call: it changes)."""
    rules: Mapping[str, policy.Rule] = field(default_factory=lambda: policy.POLICY)
    every_region: Mapping[str, Merge] = field(default_factory=dict)
    """method -> how to merge every region's answer to a call that names no region."""

    @property
    def home(self) -> str:
        """The region of calls that name neither an org nor a region."""
        return next(iter(self.apps))

    def region_of(self, method: str, message: Any) -> str | None:
        """The one region of the orgs `message` names (None: it names none)."""
        rule = self.rules.get(method)
        orgs = sorted(policy.orgs_named(rule, message)) if rule and message is not None else []
        if not orgs:
            return None
        known = self.regions_of()
        regions: dict[str, str] = {}
        for org in orgs:
            region = known.get(org)
            if region is None:
                raise TallyError(Reason.WRONG_REGION,
                                 f"org {org!r} is not known to accounts (or not yet to this "
                                 "replica), so neither is the region its data must live in; "
                                 "create it with CreateOrg first",
                                 metadata={"org_id": org})
            if region not in self.apps:
                raise TallyError(Reason.WRONG_REGION,
                                 f"org {org!r} lives in region {region!r}; this service "
                                 f"serves {', '.join(sorted(self.apps))}: call region "
                                 f"{region!r}", metadata={"org_id": org, "region": region})
            regions.setdefault(region, org)
        if len(regions) > 1:
            named = ", ".join(f"{org!r} in {region!r}" for region, org in sorted(regions.items()))
            raise TallyError(Reason.WRONG_REGION,
                             f"one request names orgs of different regions ({named}); send "
                             "one call per region", metadata={"regions": ",".join(regions)})
        return next(iter(regions))

    def _asked(self, context: Any) -> str | None:
        metadata = dict(context.invocation_metadata() or ()) if context is not None else {}
        asked = metadata.get(ROUTE_HEADER)
        if asked and asked not in self.apps:
            raise TallyError(Reason.WRONG_REGION,
                             f"{ROUTE_HEADER} names region {asked!r}; this service serves "
                             f"{', '.join(sorted(self.apps))}", metadata={"region": asked})
        return asked or None

    def register(self, server: grpc.aio.Server) -> None:
        """Registers one routing handler per method of the apps' servicers."""
        captured: dict[str, dict[str, Any]] = {}
        for region, app in self.apps.items():
            capture = _Capture()
            app.register(capture)  # type: ignore[arg-type]
            captured[region] = capture.handlers
        services: dict[str, dict[str, Any]] = {}
        for path, handler in captured[self.home].items():
            service, _, name = path[1:].partition("/")
            services.setdefault(service, {})[name] = self._route(
                path, handler, {region: found[path] for region, found in captured.items()})
        for service, handlers in services.items():
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, handlers),))
            server.add_registered_method_handlers(service, handlers)

    def _route(self, method: str, template: Any, by_region: Mapping[str, Any]) -> Any:
        decode, encode = template.request_deserializer, template.response_serializer
        if template.unary_unary:
            async def unary(request: Any, context: Any) -> Any:
                region = self.region_of(method, request) or self._asked(context)
                if region is not None:
                    return await by_region[region].unary_unary(request, context)
                merge = self.every_region.get(method)
                if merge is not None:
                    return merge(request, [await handler.unary_unary(request, context)
                                           for handler in by_region.values()])
                return await self._anywhere(by_region, request, context)

            return grpc.unary_unary_rpc_method_handler(unary, decode, encode)
        if template.unary_stream:
            async def serve(request: Any, context: Any) -> AsyncIterator[Any]:
                region = (self.region_of(method, request) or self._asked(context)
                          or self.home)
                async for item in _produced(by_region[region].unary_stream(request,
                                                                           context)):
                    yield item

            return grpc.unary_stream_rpc_method_handler(serve, decode, encode)

        async def opened(requests: AsyncIterable[Any], context: Any
                         ) -> tuple[str, AsyncIterable[Any]]:
            """The stream's region, from its first message naming an org; each later message
            must name orgs of the same region."""
            iterator = aiter(requests)
            first = await anext(iterator, None)
            region = (self.region_of(method, first) or self._asked(context) or self.home)

            async def replay() -> AsyncIterator[Any]:
                if first is not None:
                    yield first
                async for message in iterator:
                    named = self.region_of(method, message)
                    if named is not None and named != region:
                        raise TallyError(Reason.WRONG_REGION,
                                         f"this stream serves region {region!r}; a message "
                                         f"names an org of region {named!r}: open one stream "
                                         "per region", metadata={"region": named})
                    yield message

            return region, replay()

        if template.stream_unary:
            async def collect(requests: AsyncIterable[Any], context: Any) -> Any:
                region, stream = await opened(requests, context)
                return await by_region[region].stream_unary(stream, context)

            return grpc.stream_unary_rpc_method_handler(collect, decode, encode)

        async def both(requests: AsyncIterable[Any], context: Any) -> AsyncIterator[Any]:
            region, stream = await opened(requests, context)
            async for item in _produced(by_region[region].stream_stream(stream, context)):
                yield item

        return grpc.stream_stream_rpc_method_handler(both, decode, encode)

    async def _anywhere(self, by_region: Mapping[str, Any], request: Any, context: Any) -> Any:
        """A call naming no org: the home region's answer, or, where it knows nothing of the
        ids asked for, the first other region's that does."""
        regions = list(by_region)
        for index, region in enumerate(regions):
            try:
                return await by_region[region].unary_unary(request, context)
            except TallyError as exc:
                if (STATUS_OF[exc.reason] is not grpc.StatusCode.NOT_FOUND
                        or index == len(regions) - 1):
                    raise
        raise AssertionError("unreachable")


async def _produced(produced: Any) -> AsyncIterator[Any]:
    if inspect.isasyncgen(produced):
        async for item in produced:
            yield item
    else:  # a handler writing with context.write
        await produced


Merge = Callable[[Any, list[Any]], Any]
"""(request, each region's answer, home first) -> the one answer (RegionRouter.every_region)."""

BuildOne = Callable[[KitConfig, str, int], Awaitable[ServiceApp]]
"""Builds a service on `config.database_url` for a region (its name, and its index: 0 is
the home). A copy that calls a peer for its region's data (metering following the ledger's
event stream) sends ROUTE_HEADER with the region's name."""


async def build_regional(config: KitConfig, build_one: BuildOne,
                         regions_of: Callable[[], Mapping[str, str]] | None = None,
                         every_region: Mapping[str, Merge] | None = None) -> ServiceApp:
    """The service of `build_one` for every region of TALLY_REGION_DATABASES behind one
    router (without it, just `build_one(config, 0)`). `regions_of`: where org regions come
    from (default: a feed of accounts' WatchCredentials, followed while the app runs).
    `every_region`: the calls about all orgs, asked of every region, and how to merge."""
    databases = config.region_databases
    if not databases:
        return await build_one(config, "", 0)
    apps: dict[str, ServiceApp] = {}
    for index, (region, url) in enumerate(databases.items()):
        apps[region] = await build_one(dataclasses.replace(config, database_url=url), region,
                                       index)
    first = next(iter(apps.values()))
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    feed: Any = None
    if regions_of is None:
        from tally.kit.auth import CredentialCache
        from tally.kit.channels import peer_channel

        feed = CredentialCache()
        address = config.address_of("accounts")

        async def follow() -> None:
            channel = peer_channel(address)
            try:
                await feed.follow(channel, stop)
            finally:
                await channel.close()

        def from_feed() -> Mapping[str, str]:
            return feed.regions  # type: ignore[no-any-return]

        regions_of = from_feed
    shutting_down = asyncio.Event()

    async def start() -> None:
        async def propagate() -> None:
            await asyncio.wait({asyncio.ensure_future(shutting_down.wait()),
                                asyncio.ensure_future(stop.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            for app in apps.values():
                app.shutting_down.set()

        tasks.append(asyncio.create_task(propagate()))
        if feed is not None:
            tasks.append(asyncio.create_task(follow()))
            try:
                await asyncio.wait_for(feed.ready.wait(), 10)
            except TimeoutError:
                log.error("org_regions_not_loaded", accounts=config.address_of("accounts"))
        for app in apps.values():
            for hook in app.on_start:
                await hook()

    async def close() -> None:
        for app in apps.values():
            for hook in reversed(app.on_stop):
                await hook()
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    router = RegionRouter(apps, regions_of, every_region=every_region or {})
    log.info("serving_regions", service=first.name, regions=list(apps), home=router.home)
    return ServiceApp(
        name=first.name, service_names=first.service_names, register=router.register,
        on_start=[start], on_stop=[close], shutting_down=shutting_down,
        audit_database_url=first.audit_database_url,
        readiness_probes=[probe for app in apps.values() for probe in app.readiness_probes])
