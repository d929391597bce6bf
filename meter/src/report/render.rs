//! Printing an [`Output`] as an ASCII table, CSV (the total as a last row) or JSON (the total as
//! an object, money as exact decimal strings beside integer nano-USD); money is formatted by
//! [`format_usd`] and times by [`fmt_time`] in every format.

use comfy_table::{CellAlignment, Table, presets};
use serde_json::{Map, Value, json};

use super::{Cell, Kind, Output, ReportError, fmt_time};

/// Nano-USD as exact decimal dollars: `12345678901` → `12.345678901` (`price::usd_decimal`).
pub use tollgate_schemas::price::usd_decimal as format_usd;

/// How a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// A text cell that a spreadsheet opening the CSV would take for a formula (`=`, `+`, `-`, `@`,
/// a tab or a carriage return first; OWASP's CSV injection advice) starts with `'` instead:
/// group keys are the envelope's tags, which callers choose. Numbers are never text cells.
pub fn spreadsheet_safe(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{text}") } else { text.to_owned() }
}

impl Output {
    /// The report as text in `format` (ends with a newline).
    pub fn render(&self, format: Format) -> Result<String, ReportError> {
        match format {
            Format::Table => Ok(self.table()),
            Format::Csv => self.csv(),
            Format::Json => Ok(format!("{}\n", self.json())),
        }
    }

    /// A cell as every format prints it (money exact, times in UTC); the console shows the same.
    pub fn text(&self, col: usize, cell: &Cell) -> String {
        let kind = self.columns.get(col).map_or(Kind::Key, |c| c.1);
        match (cell, kind) {
            (Cell::Int(n), Kind::Usd) => format_usd(*n),
            (Cell::Int(n), _) => n.to_string(),
            (Cell::UInt(n), _) => n.to_string(),
            (Cell::Float(f), Kind::Float(d)) => format!("{f:.d$}"),
            (Cell::Float(f), _) => f.to_string(),
            (Cell::Flag(b), _) => if *b { "yes" } else { "no" }.into(),
            (Cell::Time(t), _) => fmt_time(*t),
            (Cell::Text(s), _) => s.clone(),
            (Cell::Empty, _) => String::new(),
        }
    }

    fn header(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.0.clone()).collect()
    }

    fn table(&self) -> String {
        let mut t = Table::new();
        t.load_preset(presets::ASCII_FULL_CONDENSED);
        t.set_header(self.header());
        for row in self.rows.iter().chain(self.total.iter()) {
            // An empty grouping value (an absent envelope field) reads better as "(none)".
            let cells = row.iter().enumerate().map(|(i, c)| match c {
                Cell::Text(t) if t.is_empty() => "(none)".to_owned(),
                _ => self.text(i, c),
            });
            t.add_row(cells.collect::<Vec<_>>());
        }
        for (i, (_, kind)) in self.columns.iter().enumerate() {
            if matches!(kind, Kind::Number | Kind::Usd | Kind::Float(_)) {
                if let Some(c) = t.column_mut(i) {
                    c.set_cell_alignment(CellAlignment::Right);
                }
            }
        }
        let n = self.rows.len();
        format!("{}; {}; {n} row{}\n{t}\n", self.title, self.period.describe(), if n == 1 { "" } else { "s" })
    }

    fn csv(&self) -> Result<String, ReportError> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let err = |e: csv::Error| ReportError::Csv(e.to_string());
        w.write_record(self.header()).map_err(err)?;
        for row in self.rows.iter().chain(self.total.iter()) {
            w.write_record(row.iter().enumerate().map(|(i, c)| match c {
                Cell::Text(t) => spreadsheet_safe(t),
                _ => self.text(i, c),
            }))
            .map_err(err)?;
        }
        let bytes = w.into_inner().map_err(|e| ReportError::Csv(e.to_string()))?;
        String::from_utf8(bytes).map_err(|e| ReportError::Csv(e.to_string()))
    }

    fn json_object(&self, row: &[Cell], skip_keys: bool) -> Map<String, Value> {
        let mut obj = Map::new();
        for (i, cell) in row.iter().enumerate() {
            let Some((name, kind)) = self.columns.get(i) else { continue };
            if skip_keys && *kind == Kind::Key {
                continue;
            }
            let value = match (cell, kind) {
                (Cell::Int(n), Kind::Usd) => {
                    let base = name.strip_suffix("_usd").unwrap_or(name);
                    obj.insert(format!("{base}_nanos"), json!(n));
                    json!(format_usd(*n))
                }
                (Cell::Int(n), _) => json!(n),
                (Cell::UInt(n), _) => json!(n),
                (Cell::Float(f), _) if f.is_finite() => json!(f),
                (Cell::Float(_), _) | (Cell::Empty, _) => Value::Null,
                (Cell::Flag(b), _) => json!(b),
                (Cell::Time(t), _) => json!(fmt_time(*t)),
                (Cell::Text(s), _) => json!(s),
            };
            obj.insert(name.clone(), value);
        }
        obj
    }

    /// `{"report", "title", "from", "to", "parameters", "rows": [...], "total": {...}}`; money
    /// as exact decimal strings (`cost_usd`) and integer nano-USD (`cost_nanos`).
    pub fn json(&self) -> Value {
        let mut params = Map::new();
        for (k, v) in &self.parameters {
            params.insert((*k).to_owned(), v.clone());
        }
        let rows: Vec<Value> = self.rows.iter().map(|r| Value::Object(self.json_object(r, false))).collect();
        let mut out = json!({
            "report": self.name,
            "title": self.title,
            "from": self.period.from.map(fmt_time),
            "to": self.period.to.map(fmt_time),
            "parameters": params,
            "rows": rows,
        });
        if let (Some(t), Value::Object(o)) = (&self.total, &mut out) {
            o.insert("total".into(), Value::Object(self.json_object(t, true)));
        }
        out
    }
}
