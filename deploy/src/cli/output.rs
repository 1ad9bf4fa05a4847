//! Printing answers: a table for people, JSON or YAML for programs.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// The columns a table shows of a resource path: its kind's `[column]` fields (the kind's one
/// declaration), else uuid, name, state and status.
fn columns(path: &str) -> Vec<&'static str> {
    if path == "config" {
        return vec!["name", "value", "default", "description"];
    }
    let schema = stratus_core::model::schema();
    match stratus_core::api::kind_of_path(path).and_then(|k| schema.kind(k).ok()) {
        Some(meta) => meta.columns(),
        None => vec!["uuid", "name", "state", "status"],
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table of `rows` (JSON objects) with the columns of `kind` that any row has.
pub fn table(kind: &str, rows: &[Value]) -> String {
    let cols: Vec<&str> = columns(kind)
        .into_iter()
        .filter(|c| rows.iter().any(|r| r.get(*c).is_some()))
        .collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let width = |i: usize| {
        cells
            .iter()
            .map(|r| r[i].chars().count())
            .chain([cols[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..cols.len()).map(width).collect();
    let line = |items: Vec<String>| {
        let parts: Vec<String> = items
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let mut out = line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in cells {
        out.push('\n');
        out.push_str(&line(r));
    }
    out
}

/// One object as `field  value` lines.
pub fn fields(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return cell(v);
    };
    let w = obj.keys().map(|k| k.len()).max().unwrap_or(0);
    obj.iter()
        .map(|(k, v)| format!("{k:<w$}  {}", cell(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `v` in `format`; a list (`{"items": [...]}`) of `kind` as a table of its items.
pub fn render(format: Format, kind: &str, v: &Value) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()),
        Format::Yaml => serde_yaml_ng::to_string(v).unwrap_or_else(|_| v.to_string()),
        Format::Table => match v.get("items").and_then(Value::as_array) {
            Some(items) => {
                let mut t = table(kind, items);
                if let Some(total) = v.get("total").and_then(Value::as_u64) {
                    t.push_str(&format!("\n({total} in all)"));
                }
                t
            }
            None => fields(v),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_table_shows_the_kinds_columns_that_rows_have() {
        let rows = [
            json!({"uuid": "u1", "name": "web1", "state": "Running", "cpu": 2, "extra": 1}),
            json!({"uuid": "u2", "name": "db", "state": null, "cpu": 16}),
        ];
        assert_eq!(
            table("vms", &rows),
            "UUID  NAME  STATE    CPU\nu1    web1  Running  2\nu2    db    -        16"
        );
        let list = json!({"items": rows, "total": 2});
        assert!(render(Format::Table, "vms", &list).ends_with("(2 in all)"));
        let back: Value = serde_json::from_str(&render(Format::Json, "vms", &list)).unwrap();
        assert_eq!(back, list);
        let yaml = render(Format::Yaml, "vms", &list);
        assert_eq!(serde_yaml_ng::from_str::<Value>(&yaml).unwrap(), list);
    }
}
