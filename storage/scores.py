"""The per-site score history: what each site's analysed images scored, per model version and label.

Written by ``JobStore.complete_job`` (one ``storage.db.Score`` row per label of an analysed image, in the
job's transaction); read here by drift monitoring and the site commands (``node.sites``). A site is what
``[sites] key`` makes of an image (its calling AE title by default); no patient values are stored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from storage.db import Score, SiteThreshold
from storage.records import AcceptedThreshold, SiteScore
from storage.store_base import StoreBase


class ScoreStore(StoreBase):
    """The score-history methods of ``storage.queue.Store``."""

    def score_sites(self, model_version: str) -> dict[str, int]:
        """Sites with scores of ``model_version``, each with its number of analysed images (the most scores of
        one label: a label that did not apply to some patients has fewer; purged jobs still count)."""
        with self._tx("score_sites", read_only=True) as s:
            rows = s.execute(
                select(Score.site, Score.label, func.count(Score.id))
                .where(Score.model_version == model_version)
                .group_by(Score.site, Score.label)
            ).all()
        out: dict[str, int] = {}
        for site, _, n in rows:
            out[site] = max(out.get(site, 0), int(n))
        return dict(sorted(out.items()))

    def site_scores(self, site: str, model_version: str, label: str,
                    since: dt.datetime | None = None, latest: int | None = None) -> list[SiteScore]:
        """The scores of one site, model version and label, oldest first (``since``: from then on; ``latest``:
        only the most recent so many)."""
        query = select(Score.at, Score.score, Score.positive, Score.threshold, Score.threshold_method).where(
            Score.site == site, Score.model_version == model_version, Score.label == label)
        if since is not None:
            query = query.where(Score.at >= since)
        if latest is not None:
            query = query.order_by(Score.at.desc(), Score.id.desc()).limit(latest)
        else:
            query = query.order_by(Score.at, Score.id)
        with self._tx("site_scores", read_only=True) as s:
            rows = s.execute(query).all()
        if latest is not None:
            rows = rows[::-1]
        return [SiteScore(at, float(score), bool(positive), float(threshold), method)
                for at, score, positive, threshold, method in rows]

    def paired_scores(self, version_a: str, version_b: str, label: str) -> list[tuple[float, bool, float, bool]]:
        """(score, positive) of ``version_a`` and of ``version_b`` for ``label`` on the images both scored (the live
        and the shadow package on the same jobs), oldest first."""
        a, b = aliased(Score), aliased(Score)
        with self._tx("paired_scores", read_only=True) as s:
            rows = s.execute(
                select(a.score, a.positive, b.score, b.positive)
                .join(b, (a.job_id == b.job_id) & (b.label == a.label))
                .where(a.model_version == version_a, b.model_version == version_b, a.label == label,
                       a.job_id.is_not(None))
                .order_by(a.at, a.id)
            ).all()
        return [(float(x), bool(px), float(y), bool(py)) for x, px, y, py in rows]

    def paired_positives(self, version_a: str, version_b: str) -> list[tuple[frozenset[str], frozenset[str]]]:
        """Per image both versions scored (the live and the shadow package on the same jobs), oldest first: the labels
        each decided positive. A label that did not apply to the patient has no score, so it is positive in neither."""
        with self._tx("paired_positives", read_only=True) as s:
            rows = s.execute(
                select(Score.job_id, Score.model_version, Score.label, Score.positive)
                .where(Score.model_version.in_((version_a, version_b)), Score.job_id.is_not(None))
                .order_by(Score.at, Score.id)
            ).all()
        positives: dict[int, dict[str, set[str]]] = {}
        for job_id, version, label, positive in rows:
            if job_id is None:  # excluded by the query; says so to the type checker
                continue
            decided = positives.setdefault(job_id, {version_a: set(), version_b: set(), "scored": set()})
            decided["scored"].add(version)
            if positive:
                decided[version].add(label)
        return [(frozenset(d[version_a]), frozenset(d[version_b])) for d in positives.values()
                if d["scored"] >= {version_a, version_b}]

    def accept_site_threshold(self, site: str, label: str, model_name: str, model_version: str, threshold: float,
                              method: str, accepted_by: str) -> AcceptedThreshold:
        """Put a site threshold in force for ``site``, ``label`` and ``model_version`` (its next version).

        Raises:
            ValueError: a threshold outside [0, 1].
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"a site threshold must be in [0, 1], got {threshold}")
        now = self.clock()
        with self._tx("accept_site_threshold") as s:
            latest = s.scalar(select(func.max(SiteThreshold.version)).where(
                SiteThreshold.site == site, SiteThreshold.label == label, SiteThreshold.model_version == model_version))
            row = SiteThreshold(site=site, label=label, model_name=model_name, model_version=model_version,
                                version=(latest or 0) + 1, threshold=float(threshold), method=method,
                                accepted_by=accepted_by, accepted_at=now)
            s.add(row)
        return _accepted(row)

    def site_thresholds(self, model_version: str, site: str | None = None,
                        same_scores: Sequence[str] = ()) -> dict[tuple[str, str], AcceptedThreshold]:
        """The site thresholds in force for ``model_version`` (of one site, or all), keyed by (site, label).

        ``same_scores``: earlier package versions that score every image exactly as this one (a package reissued
        with other age ranges, ``ModelManifest.same_score_versions``), latest first. A (site, label) with no threshold
        accepted for ``model_version`` keeps the one accepted for the latest of them that has one.
        """
        versions = [model_version, *same_scores]
        query = select(SiteThreshold).where(SiteThreshold.model_version.in_(versions))
        if site is not None:
            query = query.where(SiteThreshold.site == site)
        rank = {version: i for i, version in enumerate(versions)}
        with self._tx("site_thresholds", read_only=True) as s:
            rows = s.scalars(query.order_by(SiteThreshold.version)).all()
            # the earliest package version first (a stable sort keeps each one's threshold versions in order), so
            # that the later ones, and within one the highest threshold version, win
            ordered = sorted(rows, key=lambda row: -rank[row.model_version])
            return {(row.site, row.label): _accepted(row) for row in ordered}


def _accepted(row: SiteThreshold) -> AcceptedThreshold:
    return AcceptedThreshold(row.site, row.label, row.model_version, row.version, row.threshold, row.method,
                             row.accepted_by, row.accepted_at)
