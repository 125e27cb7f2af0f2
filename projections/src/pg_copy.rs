//! PostgreSQL `COPY … FROM STDIN` for rows that are new to their table.
//!
//! A plain insert (no `ON CONFLICT`) does not need the executor: `COPY`
//! streams the rows in PostgreSQL's text format and the server inserts them
//! in bulk, without the `UNNEST` function scan that materializes every row
//! before inserting it. A profile of a PostgreSQL rebuild had the backends'
//! time spread over that executor work. Rows are encoded here before the
//! write transaction begins, like every other statement (`sql.rs`).
//!
//! Only for batches of at least `COPY_ROWS_MIN` rows. sqlx flushes the
//! `CopyData` and `CopyDone` messages in separate writes on a socket without
//! `TCP_NODELAY` (sqlx 0.9 sets none and exposes no socket), so the small
//! `CopyDone` waits for the server's delayed acknowledgement of the data:
//! about 40 ms per `COPY` on Linux. With `COPY` for every plain insert,
//! `projections-bench --backend postgres --skip-rebuild` measured
//! acknowledgement-to-applied lag of p50 134 ms and p99 187 ms against 6.5
//! and 14.7 ms with `UNNEST`. A bulk build's batches carry thousands of rows
//! per statement, where the wait is small against the work it saves.
//!
//! The text format (PostgreSQL manual, "COPY", File Formats): one line per
//! row, columns separated by tabs, `\N` for NULL, and backslash escapes for
//! backslash, newline, carriage return and tab inside values. `bytea` is
//! written in its hex form, whose leading backslash is itself escaped.
//!
//! PostgreSQL stores no text holding NUL (U+0000), escaped or bound. The API
//! refuses NUL in free text, but a log written before it did may hold some, so
//! every text value bound for PostgreSQL has its NULs replaced by U+FFFD
//! (`storable_text`): without that the read model's batch could never commit.

use std::borrow::Cow;
use std::io::Write;

use uuid::Uuid;

use crate::sql::{Sink, SqlRow};

/// Plain inserts of fewer rows go through `UNNEST` like every other statement.
pub const COPY_ROWS_MIN: usize = 1024;

/// A rendered `COPY … FROM STDIN` and its data.
pub struct CopyRows {
    pub statement: String,
    pub data: Vec<u8>,
}

/// Renders `rows` for `COPY table (columns) FROM STDIN`, where `insert_head`
/// is `INSERT INTO table (columns)`.
pub fn render<R: SqlRow>(insert_head: &str, rows: &[R]) -> CopyRows {
    let target = insert_head.strip_prefix("INSERT INTO ").expect("a bulk insert starts with INSERT INTO");
    let mut sink = CopySink { data: Vec::with_capacity(rows.len() * 64), columns: 0 };
    for row in rows {
        sink.columns = 0;
        row.bind(&mut sink);
        assert_eq!(sink.columns, R::COLUMNS, "a row binds as many values as it has columns");
        sink.data.push(b'\n');
    }
    CopyRows { statement: format!("COPY {target} FROM STDIN"), data: sink.data }
}

struct CopySink {
    data: Vec<u8>,
    /// Values written so far in the current row.
    columns: usize,
}

/// `value` as PostgreSQL can store it: each NUL replaced by U+FFFD.
pub(crate) fn storable_text(value: &str) -> Cow<'_, str> {
    if value.contains('\0') { Cow::Owned(value.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(value) }
}

impl CopySink {
    fn next_column(&mut self) {
        if self.columns > 0 {
            self.data.push(b'\t');
        }
        self.columns += 1;
    }

    fn null(&mut self) {
        self.next_column();
        self.data.extend_from_slice(b"\\N");
    }

    fn escaped(&mut self, value: &str) {
        let value = storable_text(value);
        let bytes = value.as_bytes();
        let mut start = 0;
        for (at, byte) in bytes.iter().enumerate() {
            let escape: &[u8] = match byte {
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                _ => continue,
            };
            self.data.extend_from_slice(&bytes[start..at]);
            self.data.extend_from_slice(escape);
            start = at + 1;
        }
        self.data.extend_from_slice(&bytes[start..]);
    }
}

impl Sink for CopySink {
    fn i64(&mut self, value: i64) {
        self.next_column();
        write!(self.data, "{value}").expect("writing to a Vec cannot fail");
    }
    fn opt_i64(&mut self, value: Option<i64>) {
        match value {
            Some(value) => self.i64(value),
            None => self.null(),
        }
    }
    fn text(&mut self, value: &str) {
        self.next_column();
        self.escaped(value);
    }
    fn opt_text(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }
    fn uuid(&mut self, value: Uuid) {
        self.next_column();
        let mut buffer = Uuid::encode_buffer();
        self.data.extend_from_slice(value.as_hyphenated().encode_lower(&mut buffer).as_bytes());
    }
    fn opt_uuid(&mut self, value: Option<Uuid>) {
        match value {
            Some(value) => self.uuid(value),
            None => self.null(),
        }
    }
    fn bytes(&mut self, value: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.next_column();
        self.data.extend_from_slice(b"\\\\x");
        for byte in value {
            self.data.push(HEX[usize::from(byte >> 4)]);
            self.data.push(HEX[usize::from(byte & 0x0f)]);
        }
    }
    fn bool(&mut self, value: bool) {
        self.next_column();
        self.data.push(if value { b't' } else { b'f' });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Row<'a>(i64, Option<&'a str>, Uuid, &'a [u8], bool);

    impl SqlRow for Row<'_> {
        const COLUMNS: usize = 5;
        fn bind(&self, sink: &mut dyn Sink) {
            sink.i64(self.0);
            sink.opt_text(self.1);
            sink.uuid(self.2);
            sink.bytes(self.3);
            sink.bool(self.4);
        }
    }

    #[test]
    fn rows_render_in_the_text_format_with_escapes() {
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let rows = [Row(-7, Some("a\tb\\c\nd\re\0f"), id, &[0x00, 0xff], true), Row(i64::MAX, None, id, &[], false)];
        let copy = render("INSERT INTO t__g2 (a, b, c, d, e)", &rows);
        assert_eq!(copy.statement, "COPY t__g2 (a, b, c, d, e) FROM STDIN");
        assert_eq!(
            String::from_utf8(copy.data).unwrap(),
            "-7\ta\\tb\\\\c\\nd\\re\u{FFFD}f\t01234567-89ab-cdef-0123-456789abcdef\t\\\\x00ff\tt\n\
             9223372036854775807\t\\N\t01234567-89ab-cdef-0123-456789abcdef\t\\\\x\tf\n"
        );
    }
}
