//! Result batches → response bodies: JSON, CSV, Parquet or Arrow IPC (docs/http-api.md). Money columns
//! stay integers in every format.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::error::{Error, Result};

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Csv,
    Parquet,
    Arrow,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Parquet => "application/vnd.apache.parquet",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("encoding the result: {e}"))
}

/// The rows as a JSON array of objects (null fields omitted; binary as hex).
pub fn json_rows(batches: &[RecordBatch]) -> Result<serde_json::Value> {
    let mut buf = Vec::new();
    {
        let mut writer = datafusion::arrow::json::ArrayWriter::new(&mut buf);
        for b in batches {
            writer.write(b).map_err(internal)?;
        }
        writer.finish().map_err(internal)?;
    }
    if buf.is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_slice(&buf).map_err(internal)
}

/// The body of `batches` (all of schema `schema`) in `format`; JSON is a bare array of rows.
pub fn encode(format: Format, schema: SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        Format::Json => out = serde_json::to_vec(&json_rows(batches)?).map_err(internal)?,
        Format::Csv => {
            let flat: Vec<RecordBatch> = batches.iter().map(flatten_nested).collect::<Result<_>>()?;
            let mut writer = datafusion::arrow::csv::WriterBuilder::new().with_header(true).build(&mut out);
            if flat.is_empty() {
                // A header line even when there are no rows.
                let header: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                drop(writer);
                out.extend_from_slice(header.join(",").as_bytes());
                out.push(b'\n');
            } else {
                for b in &flat {
                    writer.write(b).map_err(internal)?;
                }
            }
        }
        Format::Parquet => {
            let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).map_err(internal)?;
            for b in batches {
                writer.write(b).map_err(internal)?;
            }
            writer.close().map_err(internal)?;
        }
        Format::Arrow => {
            let mut writer = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema).map_err(internal)?;
            for b in batches {
                writer.write(b).map_err(internal)?;
            }
            writer.finish().map_err(internal)?;
        }
    }
    Ok(out)
}

/// CSV has no nested values: lists, maps and binaries become their text form.
fn flatten_nested(batch: &RecordBatch) -> Result<RecordBatch> {
    let options = FormatOptions::default();
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
        let nested = matches!(
            col.data_type(),
            DataType::List(_) | DataType::LargeList(_) | DataType::Map(..) | DataType::Struct(_) | DataType::FixedSizeBinary(_) | DataType::Binary
        );
        if !nested {
            fields.push(Arc::clone(field));
            columns.push(Arc::clone(col));
            continue;
        }
        let formatter = ArrayFormatter::try_new(col.as_ref(), &options).map_err(internal)?;
        let mut b = StringBuilder::new();
        for i in 0..col.len() {
            if col.is_null(i) {
                b.append_null();
            } else {
                b.append_value(formatter.value(i).to_string());
            }
        }
        fields.push(Arc::new(Field::new(field.name(), DataType::Utf8, true)));
        columns.push(Arc::new(b.finish()));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(internal)
}
