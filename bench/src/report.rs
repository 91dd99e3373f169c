//! Tables: printed aligned for people, written as CSV for tools.

use std::{fs, path::Path};

use anyhow::Context as _;

#[derive(Debug, Clone)]
pub struct Table {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, headers: &[&str]) -> Self {
        Self {
            title: title.to_string(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table with columns padded to their widest cell.
    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.len());
            }
        }
        let line = |cells: &[String]| {
            cells
                .iter()
                .enumerate()
                .take(cols)
                .map(|(i, c)| format!("{c:<w$}", w = width[i]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let mut out = format!("{}\n{}\n", self.title, line(&self.headers));
        out.push_str(
            &width
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  "),
        );
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }

    pub fn csv(&self) -> String {
        let mut out = csv_line(&self.headers);
        for row in &self.rows {
            out.push_str(&csv_line(row));
        }
        out
    }

    /// Prints the table and writes `<dir>/<file>`.
    pub fn emit(&self, dir: &Path, file: &str) -> anyhow::Result<()> {
        println!("\n{}", self.render());
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(file);
        fs::write(&path, self.csv()).with_context(|| format!("writing {}", path.display()))?;
        println!("(written to {})", path.display());
        Ok(())
    }
}

fn csv_line(cells: &[String]) -> String {
    let mut line = cells
        .iter()
        .map(|c| {
            if c.contains([',', '"', '\n']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let mut t = Table::new("t", &["a", "b"]);
        t.row(vec!["1".into(), "x,y".into()]);
        t.row(vec!["say \"hi\"".into(), "2".into()]);
        assert_eq!(t.csv(), "a,b\n1,\"x,y\"\n\"say \"\"hi\"\"\",2\n");
    }

    #[test]
    fn render_aligns_columns() {
        let mut t = Table::new("title", &["mode", "rate"]);
        t.row(vec!["weft".into(), "12345".into()]);
        t.row(vec!["iptables".into(), "7".into()]);
        let r = t.render();
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "title");
        assert_eq!(lines[1], "mode      rate");
        assert_eq!(lines[2], "--------  -----");
        assert_eq!(lines[3], "weft      12345");
        assert_eq!(lines[4], "iptables  7");
    }
}
