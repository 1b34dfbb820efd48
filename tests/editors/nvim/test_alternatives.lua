-- Alternatives in real Neovim: an explicit request gets up to `alternatives` suggestions (the
-- greedy one first), and <M-]> / <M-[> cycle through them. Run:
--   nvim --headless --clean -l tests/editors/nvim/test_alternatives.lua PHI_LSP_BIN MODEL_DIR [auto|native|plugin]
-- Like test_controls.lua it drives a second Neovim over RPC. We type tests/editors/growing.json,
-- wait until the ghost text (an automatic request's, alone) is what `phi-lsp complete` prints, and:
--   - <M-]> asks explicitly and shows the second suggestion, another text, marked "(2/n)";
--   - <M-[> goes back to the greedy one, <M-[> again wraps to the last, <M-]> to the first again;
--   - <M-]> then <Tab> inserts the alternative shown, not the greedy one.

local repo = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h:h:h:h')
local usage = 'usage: test_alternatives.lua PHI_LSP_BIN MODEL_DIR [auto|native|plugin]'
local bin = vim.fn.fnamemodify(assert(arg[1], usage), ':p')
local model = vim.fn.fnamemodify(assert(arg[2], usage), ':p'):gsub('/$', '')
local mode = arg[3] or 'auto'
local plugin_dir = repo .. '/editors/nvim'
local label = ('nvim %s alternatives/%s'):format(tostring(vim.version()), mode)
local growing = vim.json.decode(table.concat(vim.fn.readfile(repo .. '/tests/editors/growing.json'), '\n'))
local typed = growing.text

local passed, failed = 0, 0
local function say(line)
  io.stdout:write(line, '\n')
end
local function check(ok, what, detail)
  if ok then
    passed = passed + 1
    say(('ok - %s: %s'):format(label, what))
  else
    failed = failed + 1
    say(('not ok - %s: %s%s'):format(label, what, detail and ('\n    ' .. detail:gsub('\n', '\n    ')) or ''))
  end
  return ok
end

local tmp = vim.fn.tempname()
vim.fn.mkdir(tmp, 'p')
local file = tmp .. '/alternatives.py'
vim.fn.writefile({}, file)

-- The expected value, from the one-shot CLI with the same settings.
local function cli_suggestion(text)
  vim.fn.writefile(vim.split(text, '\n'), tmp .. '/expected.py')
  local lines = vim.split(text, '\n')
  local cli = vim
    .system({ bin, 'complete', tmp .. '/expected.py', '--model', model, '--line', tostring(#lines - 1),
      '--character', tostring(#lines[#lines]), '--max-new-tokens', tostring(growing.maxNewTokens),
      '--deadline-ms', '60000', '--json' }, { text = true })
    :wait(120000)
  return cli.code == 0 and vim.json.decode(cli.stdout).text or nil, cli
end
local expected, cli = cli_suggestion(typed)
local function finish_early()
  say(('%s: %d passed, %d failed'):format(label, passed, failed))
  os.exit(failed == 0 and 0 or 1)
end
if not check(expected and expected:find('\n') ~= nil, 'phi-lsp complete gives a suggestion of several lines there',
    ('exit %s\n%s%s'):format(cli.code, cli.stdout, cli.stderr)) then
  finish_early()
end

local child = vim.fn.jobstart({ vim.v.progpath, '--embed', '--headless', '--clean', '-n', '-i', 'NONE' }, {
  rpc = true,
  env = { XDG_STATE_HOME = tmp .. '/state', XDG_CONFIG_HOME = tmp .. '/config', XDG_DATA_HOME = tmp .. '/data' },
})
assert(child > 0, 'could not start ' .. vim.v.progpath)

local function lua(code, ...)
  return vim.rpcrequest(child, 'nvim_exec_lua', code, { ... })
end
local function input(keys)
  vim.rpcrequest(child, 'nvim_input', keys)
end
local function wait_for(timeout_ms, fn, interval)
  local value
  local ok = vim.wait(timeout_ms, function()
    value = fn()
    return value ~= nil and value ~= false and value ~= vim.NIL
  end, interval or 20)
  return ok and value or nil
end
local function finish()
  pcall(vim.rpcrequest, child, 'nvim_command', 'qall!')
  vim.fn.jobwait({ child }, 5000)
  pcall(vim.fn.jobstop, child)
  finish_early()
end

lua([[
  local plugin_dir, bin, model, mode, max_new_tokens = ...
  vim.opt.runtimepath:prepend(plugin_dir)
  vim.cmd.runtime('plugin/phi_lsp.lua')
  require('phi_lsp').setup({
    cmd = { bin, '--stdio' },
    settings = { model = model, maxNewTokens = max_new_tokens, deadlineMs = 60000 },
    inline = mode,
    -- The default keys, spelled out: the test presses them.
    next_key = '<M-]>',
    prev_key = '<M-[>',
  })
  vim.o.statusline = "%{v:lua.require'phi_lsp'.statusline()}"
]], plugin_dir, bin, model, mode, growing.maxNewTokens)

local kind = lua([[return require('phi_lsp').inline_kind()]])
label = ('%s (%s ghost text)'):format(label, kind)
lua('vim.cmd.edit(...)', file)
local attached = wait_for(20000, function()
  return lua([[local c = require('phi_lsp').clients(0)[1]; return c and c.initialized and c.id or nil]])
end)
if not check(attached ~= nil, 'phi_lsp attaches to a Python buffer') then
  finish()
end
local function status()
  return lua([[return require('phi_lsp').status(nil, 2000)]])
end
local ready = wait_for(60000, function()
  local s = status()
  return type(s) == 'table' and s.state ~= 'loading' and s or nil
end)
if not check(ready and ready.state == 'ready', 'the model is ready', vim.inspect(ready)) then
  finish()
end

local function buffer_text()
  return lua([[return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\n')]])
end
local ghost_reader = [=[
  local kind = ...
  local ns = vim.api.nvim_get_namespaces()[kind == 'native' and 'nvim.lsp.inline_completion' or 'phi_lsp.ghost']
  local marks = ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}
  if #marks == 0 then return nil end
  local details = marks[1][4]
  local first = ''
  for _, chunk in ipairs(details.virt_text or {}) do
    first = first .. chunk[1]
  end
  local lines = { first }
  for _, virt_line in ipairs(details.virt_lines or {}) do
    local text = ''
    for _, chunk in ipairs(virt_line) do
      text = text .. chunk[1]
    end
    lines[#lines + 1] = text
  end
  return table.concat(lines, '\n')
]=]
local function ghost()
  local g = lua(ghost_reader, kind)
  return type(g) == 'string' and g or nil
end
local function ghost_is(text)
  return function()
    return ghost() == text or nil
  end
end
local function next_part(rest, part)
  return lua([[return require('phi_lsp').next_part(...)]], rest, part)
end


-- The ghost text without the "(i/n)" mark that cycling adds, and the mark.
local function shown()
  local g = ghost()
  if not g then
    return nil
  end
  local i, n = g:match(' %((%d+)/(%d+)%)$')
  return (g:gsub(' %(%d+/%d+%)$', '')), tonumber(i), tonumber(n)
end

lua('vim.bo.autoindent = false; vim.bo.indentexpr = ""; vim.bo.smartindent = false')
input('i' .. typed:gsub('\n', '<CR>'))
check(wait_for(5000, function()
  return buffer_text() == typed or nil
end) ~= nil, 'the keys reach the buffer', buffer_text())
local whole = wait_for(60000, ghost_is(expected))
if not check(whole ~= nil, 'the ghost text is the whole suggestion of `phi-lsp complete`',
    ('ghost:    %q\nexpected: %q'):format(ghost() or '', expected)) then
  finish()
end
check(status().last.alternatives == 0, 'an automatic request got one suggestion', vim.inspect(status().last))

input('<M-]>')
local second = wait_for(60000, function()
  local text, i = shown()
  return text and i == 2 and text or nil
end)
local text, index, count = shown()
if not check(second ~= nil and second ~= expected, '<M-]> asks explicitly and shows another suggestion, marked (2/n)',
    ('ghost: %q (%s/%s)\ngreedy: %q'):format(text or '', index, count, expected)) then
  finish()
end
local offered = status().last.alternatives
check(count == offered and offered >= 2 and offered <= 3,
  ('the mark counts the suggestions the server offered (%s)'):format(offered), vim.inspect(status().last))

input('<M-[>')
check(wait_for(3000, function()
  local t, i = shown()
  return t == expected and i == 1 or nil
end) ~= nil, '<M-[> goes back to the greedy one (1/n)', ghost())
input('<M-[>')
check(wait_for(3000, function()
  local t, i = shown()
  return t ~= expected and i == count or nil
end) ~= nil, '<M-[> again wraps around to the last one', ghost())
input('<M-]>')
check(wait_for(3000, function()
  local t, i = shown()
  return t == expected and i == 1 or nil
end) ~= nil, '<M-]> wraps back to the first', ghost())

input('<M-]>')
wait_for(3000, function()
  local _, i = shown()
  return i == 2 or nil
end)
input('<Tab>')
check(wait_for(5000, function()
  return buffer_text() == typed .. second or nil
end) ~= nil, '<Tab> inserts the alternative shown', ('buffer: %q\nwanted: %q'):format(buffer_text(), typed .. second))
local errmsg = lua('return vim.v.errmsg')
check(errmsg == '', 'no error on the way', errmsg)

finish()
