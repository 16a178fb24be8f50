"""What ``compress`` did to each layer, as a table."""

import csv
import dataclasses
from typing import List, Optional

COMPRESSED = "compressed"
SKIPPED = "skipped"


@dataclasses.dataclass
class LayerReport:
    """One row of the report.

    ``params_before`` counts the original layer's parameters (kernel and
    bias); ``params_after`` the nonzero parameters of its replacement (equal
    to ``params_before`` for a skipped layer). ``relative_error`` is
    ``||W - W_hat||_F / ||W||_F`` between the original kernel and the
    replacement's reconstructed kernel.
    """

    name: str
    layer_type: str
    method: str
    params_before: int
    params_after: int
    relative_error: Optional[float] = None
    seconds: float = 0.0
    status: str = COMPRESSED
    note: str = ""


@dataclasses.dataclass
class CompressionReport:
    """Per-layer rows plus totals; ``print(report)`` shows the table.

    ``callbacks`` are the callbacks ``model.fit`` needs for the compressed
    model (empty for most methods).
    """

    method: str
    rows: List[LayerReport] = dataclasses.field(default_factory=list)
    callbacks: list = dataclasses.field(default_factory=list)

    @property
    def compressed(self):
        return [row for row in self.rows if row.status == COMPRESSED]

    @property
    def skipped(self):
        return [row for row in self.rows if row.status == SKIPPED]

    @property
    def params_before(self):
        return sum(row.params_before for row in self.rows)

    @property
    def params_after(self):
        return sum(row.params_after for row in self.rows)

    @property
    def compression_ratio(self):
        """Parameters before / after, over the layers listed."""
        return self.params_before / max(self.params_after, 1)

    @property
    def seconds(self):
        return sum(row.seconds for row in self.rows)

    def as_dicts(self):
        return [dataclasses.asdict(row) for row in self.rows]

    def to_csv(self, path):
        """Write the rows to ``path`` as CSV."""
        fields = [f.name for f in dataclasses.fields(LayerReport)]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.as_dicts())

    def __str__(self):
        header = ("layer", "type", "status", "params", "nonzero after", "rel. error", "seconds")
        lines = [header]
        for row in self.rows:
            error = "" if row.relative_error is None else f"{row.relative_error:.4f}"
            status = row.status if not row.note else f"{row.status} ({row.note})"
            lines.append((
                row.name, row.layer_type, status, f"{row.params_before:,}",
                f"{row.params_after:,}", error, f"{row.seconds:.2f}",
            ))
        lines.append((
            "total", "", f"method {self.method}", f"{self.params_before:,}",
            f"{self.params_after:,}", f"x{self.compression_ratio:.1f}", f"{self.seconds:.2f}",
        ))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in lines
        ]
        text.insert(1, "-" * len(text[0]))
        text.insert(len(text) - 1, "-" * len(text[0]))
        return "\n".join(text)
