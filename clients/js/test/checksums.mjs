// Print, as a JSON array, rtcore.js's checksum of each line of a file (one JSON state
// per line, as the server encodes it). tests/js/test_js_client.py compares them with Python's.
import { readFileSync } from "node:fs";
import { checksum, parseJSON } from "../rtcore.js";

const lines = readFileSync(process.argv[2], "utf8").split("\n");
process.stdout.write(JSON.stringify(lines.map((line) => checksum(parseJSON(line)))));
