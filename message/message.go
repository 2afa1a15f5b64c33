// Package message owns the Aleph message model: the signed envelope, every
// message type's content, and their validation exactly as aleph-message
// 1.1.1 defines them, with the errors naming the JSON path of the offending
// field. The rest of the node consumes *Message and ExecutableContent.
package message

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// MaxMessageSize bounds the JSON document of one message. The largest valid
// message carries 200,000 characters of item_content, escaped, next to the
// same content decoded; 4 MiB leaves room for that and nothing absurd.
const MaxMessageSize = 4 << 20

var mongoID = &model{name: "MongodbId", extra: extraForbid, fields: []field{req("$oid", anyString)}}

var confirmationHash = &model{name: "MessageConfirmationHash", extra: extraForbid, fields: []field{
	req("$binary", anyString),
	req("$type", anyString),
}}

var confirmation = &model{name: "MessageConfirmation", extra: extraForbid, fields: []field{
	req("chain", chainType),
	req("height", laxInt),
	req("hash", stringOr(confirmationHash)),
	opt("time", anyFloat),
	opt("publisher", anyString),
}}

// envelope is BaseMessage and its subclasses. Its checks read fields
// validated before them, as the Pydantic field validators do.
var envelope = &model{name: "Message", extra: extraForbid, fields: []field{
	opt("_id", mongoID.typ()),
	req("chain", chainType),
	req("sender", anyString),
	req("type", enumType(typeNames()...)),
	opt("channel", strType(MaxChannelLength)),
	opt("confirmations", listType(confirmation.typ(), 0)),
	{key: "confirmed", t: boolType, nullable: true, check: checkConfirmed},
	{key: "signature", t: anyString, required: true, nullable: true},
	opt("size", laxInt),
	req("time", datetimeType),
	req("item_type", itemTypeType),
	{key: "item_content", t: anyString, nullable: true, check: checkItemContent},
	opt("hash_type", enumType("sha256")),
	{key: "item_hash", t: itemHashType, required: true, check: checkItemHash},
	{key: "content", t: contentType, required: true, check: checkContent},
	{key: "forgotten_by", t: listType(anyType, 0), nullable: true, check: checkForgottenBy},
}}

func typeNames() []string {
	names := make([]string, len(Types))
	for i, t := range Types {
		names[i] = string(t)
	}
	return names
}

func checkConfirmed(c *checker, p path, v any, sib map[string]any) (any, bool) {
	if confirmations, _ := sib["confirmations"].([]any); v == true && len(confirmations) == 0 {
		c.fail(p, "Message cannot be 'confirmed' without 'confirmations'")
		return nil, false
	}
	return v, true
}

func checkItemContent(c *checker, p path, v any, sib map[string]any) (any, bool) {
	itemType, ok := sib["item_type"].(string)
	if !ok {
		return v, true // item_type itself failed and was reported
	}
	if itemType != string(ItemInline) {
		c.fail(p, "Field 'item_content' cannot be defined when 'item_type' == '%s'", itemType)
		return nil, false
	}
	s := v.(string)
	if n := utf8.RuneCountInString(s); n > MaxInlineContentLength {
		c.fail(p, "message too long: %d characters of inline content, at most %d; use storage or ipfs", n, MaxInlineContentLength)
		return nil, false
	}
	if err := checkShape([]byte(s)); err != nil {
		c.fail(p, "%v", err)
		return nil, false
	}
	if !json.Valid([]byte(s)) {
		c.fail(p, "Field 'item_content' does not appear to be valid JSON")
		return nil, false
	}
	return v, true
}

func checkItemHash(c *checker, p path, v any, sib map[string]any) (any, bool) {
	hash := v.(string)
	switch sib["item_type"] {
	case string(ItemInline):
		content, ok := sib["item_content"].(string)
		if !ok {
			// The reference crashes here with an AttributeError; pyaleph says this.
			c.fail("item_content", "Item content not specified for inline item type")
			return nil, false
		}
		if want := SHA256Hex([]byte(content)); hash != want {
			c.fail(p, "'item_hash' do not match 'sha256(item_content)', expecting %s", want)
			return nil, false
		}
	case string(ItemStorage):
		// As pyaleph checks: the format must match the item type.
		if ItemHash(hash).Type() != ItemStorage {
			c.fail(p, "must be a sha256 hex digest when item_type is 'storage', got %q", hash)
			return nil, false
		}
	case string(ItemIPFS):
		if ItemHash(hash).Type() != ItemIPFS {
			c.fail(p, "must be an IPFS CID when item_type is 'ipfs', got %q", hash)
			return nil, false
		}
	}
	return v, true
}

// contentType checks only that content is an object: which model applies
// depends on the envelope's type, so checkContent validates it.
func contentType(c *checker, p path, v any) (any, bool) {
	return objectOf(0)(c, p, v)
}

// checkContent validates content against its type's model. For inline
// messages it returns the content parsed from item_content instead: the
// signed bytes are authoritative, as pyaleph treats them.
func checkContent(c *checker, p path, v any, sib map[string]any) (any, bool) {
	t, ok := sib["type"].(string)
	if !ok {
		return nil, false // type failed and was reported
	}
	m := contentModels[Type(t)]
	norm, ok := m.validate(c, p, v)
	if !ok {
		return nil, false
	}
	itemContent, inline := sib["item_content"].(string)
	if !inline || sib["item_type"] != string(ItemInline) {
		return norm, true
	}
	var signed any
	dec := json.NewDecoder(strings.NewReader(itemContent))
	dec.UseNumber()
	if err := dec.Decode(&signed); err != nil {
		return nil, false // reported by checkItemContent
	}
	if Type(t) == TypeProgram && !pyEqual(norm, signed) {
		// ProgramMessage.check_content: model_dump(exclude_none) must equal
		// json.loads(item_content).
		c.fail(p, "Content and item_content differ")
		return nil, false
	}
	return m.validate(c, "item_content", signed)
}

func checkForgottenBy(c *checker, p path, v any, sib map[string]any) (any, bool) {
	list := v.([]any)
	switch Type(fmt.Sprint(sib["type"])) {
	case TypeForget:
		if len(list) > 0 {
			c.fail(p, "This type of message may not be forgotten")
			return nil, false
		}
	case TypeProgram, TypeInstance, TypePost:
		// Optional[List[str]] for these types; Optional[list] for the others.
		return stringList(c, p, list)
	}
	return v, true
}

// datetimeType accepts what Pydantic v2's datetime accepts in JSON: Unix
// seconds as a number or numeric string (milliseconds above 2e10), or an
// ISO 8601 string; a time without an offset is taken as UTC.
func datetimeType(c *checker, p path, v any) (any, bool) {
	var num string
	switch x := v.(type) {
	case json.Number:
		num = string(x)
	case string:
		if _, err := strconv.ParseFloat(strings.TrimSpace(x), 64); err == nil {
			num = strings.TrimSpace(x)
		} else if t, ok := parseISOTime(x); ok {
			return t, true
		}
	}
	if num != "" {
		f, err := strconv.ParseFloat(num, 64)
		if err == nil && !math.IsInf(f, 0) && !math.IsNaN(f) {
			if math.Abs(f) > 2e10 {
				f /= 1000
			}
			sec, frac := math.Modf(f)
			if math.Abs(sec) < 1e13 {
				return time.Unix(int64(sec), int64(math.Round(frac*1e6))*1e3).UTC(), true
			}
		}
	}
	c.fail(p, "must be a Unix timestamp or an ISO 8601 datetime, got %s", describe(v))
	return nil, false
}

var isoLayouts = []string{
	time.RFC3339Nano,
	"2006-01-02T15:04:05.999999999",
	"2006-01-02 15:04:05.999999999Z07:00",
	"2006-01-02 15:04:05.999999999",
	"2006-01-02T15:04Z07:00",
	"2006-01-02T15:04",
	"2006-01-02",
}

func parseISOTime(s string) (time.Time, bool) {
	for _, layout := range isoLayouts {
		if t, err := time.Parse(layout, s); err == nil {
			return t, true
		}
	}
	return time.Time{}, false
}

// Parse validates a message as received and returns it with its typed
// content. Errors are a *ValidationError naming each offending field, or a
// plain error for input that is not a JSON object of bounded size.
func Parse(data []byte) (*Message, error) {
	if len(data) > MaxMessageSize {
		return nil, fmt.Errorf("message is %d bytes, more than the %d allowed", len(data), MaxMessageSize)
	}
	if err := checkShape(data); err != nil {
		return nil, fmt.Errorf("message is not valid JSON: %w", err)
	}
	var doc any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("message is not valid JSON: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("message is not valid JSON: data after the top-level value")
	}
	c := &checker{}
	norm, ok := envelope.validate(c, "", doc)
	if !ok {
		return nil, c.err()
	}
	return build(norm.(map[string]any))
}

// ReadMessage reads and parses one message, refusing to read more than
// MaxMessageSize bytes.
func ReadMessage(r io.Reader) (*Message, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxMessageSize+1))
	if err != nil {
		return nil, fmt.Errorf("read message: %w", err)
	}
	return Parse(data)
}

// build decodes the normalized tree into the typed structs.
func build(norm map[string]any) (*Message, error) {
	content := norm["content"]
	delete(norm, "content")
	delete(norm, "_id")
	var msg Message
	if err := remarshal(norm, &msg); err != nil {
		return nil, fmt.Errorf("decode message envelope: %w", err)
	}
	msg.Content = newContent(msg.Type)
	if err := remarshal(content, msg.Content); err != nil {
		return nil, fmt.Errorf("decode %s content: %w", msg.Type, err)
	}
	return &msg, nil
}

func remarshal(from, to any) error {
	data, err := json.Marshal(from)
	if err != nil {
		return err
	}
	return json.Unmarshal(data, to)
}

// Regenerate sets item_content to the compact JSON of content and item_hash
// to its sha256, as aleph-message's create_message_from_json does (and as
// its tests do with the fixtures). Key order and every other field are kept.
func Regenerate(data []byte) ([]byte, error) {
	if len(data) > MaxMessageSize {
		return nil, fmt.Errorf("message is %d bytes, more than the %d allowed", len(data), MaxMessageSize)
	}
	doc, err := decodeOrdered(data)
	if err != nil {
		return nil, err
	}
	env, ok := doc.(orderedObject)
	if !ok {
		return nil, errors.New("message must be a JSON object")
	}
	content, ok := env.vals["content"]
	if !ok {
		return nil, errors.New("content: field required to regenerate item_content")
	}
	itemContent, err := pyDumps(content)
	if err != nil {
		return nil, fmt.Errorf("content: %w", err)
	}
	env.set("item_content", itemContent)
	env.set("item_hash", SHA256Hex([]byte(itemContent)))
	out, err := pyDumps(env)
	if err != nil {
		return nil, err
	}
	return []byte(out), nil
}

func (o *orderedObject) set(k string, v any) {
	if _, ok := o.vals[k]; !ok {
		o.keys = append(o.keys, k)
	}
	o.vals[k] = v
}
