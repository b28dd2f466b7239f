"""Which provider serves a registration: by platform, and by app for direct transports."""

from __future__ import annotations

from ringrelay.models import Platform, Registration
from ringrelay.providers import PushProvider


class ProviderRouter:
    """Which provider serves a registration: by platform, and by app where a platform has several
    directly configured apps (APNs bundles, Firebase projects)."""

    def __init__(
        self,
        routes: dict[Platform, PushProvider],
        apps: dict[Platform, dict[str, PushProvider]] | None = None,
    ) -> None:
        self.routes = routes  # a platform's provider when the app does not matter
        self.apps = apps or {}  # platform -> app id -> provider, for direct transports

    def for_platform(self, platform: Platform) -> PushProvider | None:
        return self.routes.get(platform)

    def for_registration(self, reg: Registration) -> PushProvider | None:
        apps = self.apps.get(reg.platform)
        if apps is None:
            return self.routes.get(reg.platform)
        if reg.app_id is None:
            return self.routes.get(reg.platform)  # set only when the platform has one app
        return apps.get(reg.app_id)

    def registration_error(self, platform: Platform, app_id: str | None) -> tuple[str, str] | None:
        """(field, message) when no transport would deliver to such a registration."""
        apps = self.apps.get(platform)
        if apps is None:
            if platform not in self.routes:
                return "platform", f"no delivery transport is configured for {platform.value}"
            return None
        if app_id is None:
            if platform in self.routes:
                return None
            return "app_id", (
                f"required: {len(apps)} {platform.value} apps are configured "
                f"({', '.join(sorted(apps))})"
            )
        if app_id not in apps:
            return "app_id", (
                f"no {platform.value} app {app_id!r} is configured "
                f"(configured: {', '.join(sorted(apps))})"
            )
        return None

    def providers(self) -> list[PushProvider]:
        unique: dict[int, PushProvider] = {id(p): p for p in self.routes.values()}
        for apps in self.apps.values():
            unique.update({id(p): p for p in apps.values()})
        return list(unique.values())
