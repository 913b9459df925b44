// Task statuses: a colour, a light tint and an icon each, so a status never relies on
// colour alone (the DAG draws the icon and the word; tables show badges with the word).
export const STATUS = {
  Waiting: { color: "#8a8f98", tint: "#f1f2f4", icon: "○" },
  Pending: { color: "#2f7dd1", tint: "#e7f0fb", icon: "◷" },
  Running: { color: "#e09a12", tint: "#fdf3e1", icon: "▶" },
  Paused: { color: "#8a55c9", tint: "#f2ebfa", icon: "‖" },
  Success: { color: "#2e9d4f", tint: "#e6f5ea", icon: "✓" },
  Failure: { color: "#d1382f", tint: "#fbe9e8", icon: "✗" },
  Canceled: { color: "#555b63", tint: "#ebecee", icon: "⊘" },
};

export const TERMINAL = new Set(["Success", "Failure", "Canceled"]);

export function statusOf(name) {
  return STATUS[name] || { color: "#999", tint: "#eee", icon: "?" };
}
