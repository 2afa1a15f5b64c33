package hostile

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/message"
)

const (
	sender  = "0x101d8D16372dBf5f1614adaE95Ee5CCE61998Fc9"
	someRef = "7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003"
)

// programMessage is a valid PROGRAM message as a JSON object, its content
// edited by edit, with item_content and item_hash made to match it again:
// only the edit is hostile.
func programMessage(t *testing.T, edit func(content map[string]any)) []byte {
	t.Helper()
	iface := message.InterfaceBinary
	raw, _, err := message.NewProgram(message.Header{Sender: sender, Time: time.Unix(1700000000, 0)}, message.ProgramContent{
		ExecutableBase: message.ExecutableBase{Resources: message.MachineResources{VCPUs: 1, MemoryMiB: 256, Seconds: 30}},
		Type:           "vm-function",
		Code:           message.CodeContent{Encoding: message.EncodingZip, Entrypoint: "main", Ref: someRef, Interface: &iface},
		Runtime:        message.FunctionRuntime{Ref: someRef},
		On:             message.FunctionTriggers{HTTP: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	var env map[string]any
	if err := json.Unmarshal(raw, &env); err != nil {
		t.Fatal(err)
	}
	edit(env["content"].(map[string]any))
	data, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	out, err := message.Regenerate(data)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func parse(t *testing.T, data []byte) answer {
	t.Helper()
	_, err := message.Parse(data)
	return refusedErr(t, err)
}

// configDrive edits the config drive a program's launcher writes for a
// valid message, as a hostile message field would make it.
func configDrive(input string, edit func(c *guest.Config)) row {
	return row{category: "Messages", input: input, target: "`guest.WriteConfigDrive` (the config drive of a program VM)", run: func(t *testing.T) answer {
		c := guest.Config{Version: guest.ConfigVersion, Hostname: "vm",
			Workload: guest.Workload{Interface: guest.InterfaceBinary, Entrypoint: "main"},
			Drives: []guest.Drive{
				{Role: guest.RoleRuntime, Format: guest.FormatSquashfs, Mount: "/", ReadOnly: true},
				{Role: guest.RoleCode, Format: guest.FormatZip, Mount: "/opt/code", ReadOnly: true, Size: 100},
			}}
		edit(&c)
		dir := t.TempDir()
		err := guest.WriteConfigDrive(filepath.Join(dir, "config.img"), c)
		checkEmptyDir(t, dir)
		return refusedErr(t, err)
	}}
}

func messageRows() []row {
	const target = "`message.Parse`"
	msg := func(input string, edit func(c map[string]any)) row {
		return row{category: "Messages", input: input, target: target, run: func(t *testing.T) answer {
			return parse(t, programMessage(t, edit))
		}}
	}
	raw := func(input string, data func(t *testing.T) []byte) row {
		return row{category: "Messages", input: input, target: target, run: func(t *testing.T) answer {
			return parse(t, data(t))
		}}
	}
	resources := func(c map[string]any) map[string]any { return c["resources"].(map[string]any) }
	return []row{
		raw("empty input", func(t *testing.T) []byte { return nil }),
		raw("not JSON: `hello`", func(t *testing.T) []byte { return []byte("hello") }),
		raw("a JSON array instead of an object", func(t *testing.T) []byte { return []byte(`[{"type":"PROGRAM"}]`) }),
		raw("100 000 nested arrays", func(t *testing.T) []byte { return bytes.Repeat([]byte("["), 100000) }),
		raw("a message of 4 MiB + 1 byte", func(t *testing.T) []byte { return bytes.Repeat([]byte(" "), message.MaxMessageSize+1) }),
		raw("a valid message followed by a second object", func(t *testing.T) []byte {
			return append(programMessage(t, func(map[string]any) {}), "{}"...)
		}),
		row{category: "Messages", input: "`item_hash` that is not the sha256 of `item_content`", target: target, run: func(t *testing.T) answer {
			data := programMessage(t, func(map[string]any) {})
			var env map[string]any
			json.Unmarshal(data, &env)
			env["item_hash"] = strings.Repeat("0", 64)
			data, _ = json.Marshal(env)
			return parse(t, data)
		}},
		row{category: "Messages", input: "`content` that differs from the signed `item_content` (more memory)", target: target, run: func(t *testing.T) answer {
			data := programMessage(t, func(map[string]any) {})
			var env map[string]any
			json.Unmarshal(data, &env)
			env["content"].(map[string]any)["resources"].(map[string]any)["memory"] = 65536
			data, _ = json.Marshal(env)
			return parse(t, data)
		}},
		msg("`resources.vcpus` 0", func(c map[string]any) { resources(c)["vcpus"] = 0 }),
		msg("`resources.vcpus` 1e300", func(c map[string]any) { resources(c)["vcpus"] = 1e300 }),
		msg("`resources.memory` -1", func(c map[string]any) { resources(c)["memory"] = -1 }),
		msg("`resources.seconds` `\"NaN\"`", func(c map[string]any) { resources(c)["seconds"] = "NaN" }),
		msg("`code.ref` `../../etc/passwd`", func(c map[string]any) { c["code"].(map[string]any)["ref"] = "../../etc/passwd" }),
		msg("`code.encoding` `tar`", func(c map[string]any) { c["code"].(map[string]any)["encoding"] = "tar" }),
		configDrive("a volume mounted at `../../../etc` (`message.Parse` takes it, as aleph-message does)", func(c *guest.Config) {
			c.Drives = append(c.Drives, guest.Drive{Role: guest.RoleVolume, Format: guest.FormatExt4, Mount: "../../../etc"})
		}),
		configDrive("a binary `code.entrypoint` of `../../sbin/init`", func(c *guest.Config) {
			c.Workload.Entrypoint = "../../sbin/init"
		}),
		configDrive("two volumes mounted at `/opt/code`, over the code", func(c *guest.Config) {
			c.Drives = append(c.Drives, guest.Drive{Role: guest.RoleVolume, Format: guest.FormatExt4, Mount: "/opt/code"},
				guest.Drive{Role: guest.RoleVolume, Format: guest.FormatExt4, Mount: "/opt/code"})
		}),
		msg("10 000 volumes", func(c map[string]any) {
			vols := make([]any, 10000)
			for i := range vols {
				vols[i] = map[string]any{"mount": "/v", "ephemeral": true, "size_mib": 1}
			}
			c["volumes"] = vols
		}),
		row{category: "Messages", input: "a PROGRAM whose `metadata` holds a list of 2 million numbers (3.9 MiB)", target: target, maxAllocMiB: 1,
			run: func(t *testing.T) answer {
				data := programMessage(t, func(map[string]any) {})
				list := "[" + strings.Repeat("1,", 2_000_000) + "1]"
				data = bytes.Replace(data, []byte(`"content":{`), []byte(`"content":{"metadata":{"x":`+list+`},`), 1)
				var err error
				feed(func() { _, err = message.Parse(data) })
				return refusedErr(t, err)
			}},
		msg("`time` 1e300", func(c map[string]any) { c["time"] = 1e300 }),
		raw("an unknown message `type`", func(t *testing.T) []byte {
			data := programMessage(t, func(map[string]any) {})
			return bytes.Replace(data, []byte(`"type":"PROGRAM"`), []byte(`"type":"EXPLOIT"`), 1)
		}),
		raw("`item_content` that is not valid UTF-8", func(t *testing.T) []byte {
			data := programMessage(t, func(map[string]any) {})
			return bytes.Replace(data, []byte(`"vm-function"`), []byte("\"vm-\xff\xfe\""), 1)
		}),
	}
}
